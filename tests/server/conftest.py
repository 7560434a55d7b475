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


SEEDS = range(12)      # every seed the server tests ask the Sudoku model for


@pytest.fixture(scope="session")
def puzzles(sudoku_model):
    """8 held-out puzzles the bundled model solves with every seed the tests use: (text, grid).
    Chosen by running the model, easiest (most givens) first, so they do not depend on the sampler's
    random stream."""
    chosen = []
    for puzzle, _ in sorted(sd.test_set(64), key=lambda pair: -int((pair[0] > 0).sum())):
        outs = portable_dg.generate_batch(sudoku_model, [sd.prompt_ids(puzzle)] * len(SEEDS), seed=list(SEEDS),
                                          max_new_tokens=sd.CELLS)
        if all(not sd.rule_violations(sd.grid_from_ids(o.sequences[0, sd.PROMPT_LENGTH:]), puzzle) for o in outs):
            chosen.append((sd.grid_text(puzzle), puzzle))
        if len(chosen) == 8:
            return chosen
    pytest.fail("fewer than 8 of 64 held-out puzzles are solved with every seed")
