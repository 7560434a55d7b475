"""Fixtures of the server tests: the bundled Sudoku model and a synthetic text model, each served
on a free loopback port for a module."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")

import portable_dg  # noqa: E402
from portable_dg import sudoku as sd  # noqa: E402
from serving import running_server  # noqa: E402


@pytest.fixture(scope="session")
def sudoku_model():
    return portable_dg.load(sd.default_model_path())


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    """A synthetic tiny checkpoint with a byte-level tokenizer and a chat template (canvas of 16)."""
    from portable_dg.synth import write_synthetic

    path = tmp_path_factory.mktemp("synth") / "tiny"
    write_synthetic(path, like="tiny", dtype="f32")
    return portable_dg.load(path)


@pytest.fixture(scope="module")
def sudoku_server(sudoku_model):
    with running_server(sudoku_model) as running:
        yield running


@pytest.fixture(scope="module")
def text_server(text_model):
    with running_server(text_model, model_name="tiny") as running:
        yield running


@pytest.fixture(scope="session")
def puzzles():
    """Held-out puzzles the bundled model solves with seed 0: (puzzle text, puzzle grid)."""
    return [(sd.grid_text(p), p) for p, _ in sd.test_set(8)]
