"""Shared fixtures: tiny checkpoints built once per session (see tests/tiny.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny_dir(name="a", dtype="float32") -> Path of a saved tiny checkpoint (cached)."""
    made: dict[tuple[str, str], Path] = {}

    def make(name: str = "a", dtype: str = "float32") -> Path:
        key = (name, dtype)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny_{name}_{dtype}")
            build_tiny(path, name, dtype=dtype)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_a(tiny_dir) -> Path:
    """The spec §7.1 tiny checkpoint (fp32)."""
    return tiny_dir("a")
