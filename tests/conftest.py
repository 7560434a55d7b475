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


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """Factory: tiny_model(name="a", **load_options) -> portable_dg.Model on the numpy backend (cached)."""
    import portable_dg

    loaded: dict[tuple, object] = {}

    def make(name: str = "a", **options):
        key = (name, tuple(sorted(options.items())))
        if key not in loaded:
            loaded[key] = portable_dg.load(tiny_dir(name), **options)
        return loaded[key]

    return make


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """Factory: hf_model(name="a", dtype="float32") -> the transformers model of a tiny checkpoint
    (cached; float64 is a copy of the float32 model with eager experts)."""
    from reference import hf_models

    return hf_models(tiny_dir)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny matrices: one intra-op torch thread is faster, and immune to oversubscribed CI cores."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
