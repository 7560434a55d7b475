"""The Sudoku task: generator, token format, bundled model, training objective and `pdg sudoku`."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import portable_dg
from portable_dg import sudoku as sd
from portable_dg.cli import main
from portable_dg.errors import ConfigError

# A contradictory puzzle: row 1 gives 5 twice, so no answer can be valid.
CONTRADICTION = "55" + "0" * 79


@pytest.fixture(scope="module")
def bundled():
    return portable_dg.load(sd.default_model_path(), backend="numpy")


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_generated_puzzles_have_one_solution(difficulty):
    low, high = sd.DIFFICULTY[difficulty]
    for puzzle, solution in sd.puzzles(11, 3, difficulty):
        assert low <= int((puzzle > 0).sum()) <= high
        assert sd.count_solutions(puzzle) == 1
        assert sd.rule_violations(solution, puzzle) == []
        assert np.all((puzzle == 0) | (puzzle == solution))


def test_generator_is_seeded():
    a, b = sd.puzzles(5, 2), sd.puzzles(5, 2)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert not np.array_equal(a[0][0], sd.puzzles(6, 1)[0][0])


def test_validation_and_test_sets_differ():
    test = {sd.grid_text(p) for p, _ in sd.test_set(50)}
    validation = {sd.grid_text(p) for p, _ in sd.validation_set(50)}
    assert len(test) == len(validation) == 50 and not test & validation


def test_count_solutions_sees_several():
    assert sd.count_solutions([0] * 81) == 2


def test_parse_puzzle_blanks_and_errors():
    text = "53..7...." + "0" * 72
    grid = sd.parse_puzzle(text)
    assert sd.grid_text(grid) == "530070000" + "0" * 72
    with pytest.raises(ConfigError, match="81 characters"):
        sd.parse_puzzle("123")
    with pytest.raises(ConfigError, match="81 characters"):
        sd.parse_puzzle("x" * 81)


def test_givens_regex_matches_exactly_the_answers_that_keep_the_givens():
    puzzle, solution = sd.test_set(1)[0]
    pattern = re.compile(sd.givens_regex(puzzle))
    assert pattern.fullmatch(sd.grid_text(solution))
    changed = solution.copy()
    given = int(np.flatnonzero(puzzle)[0])
    changed[given] = changed[given] % 9 + 1
    assert not pattern.fullmatch(sd.grid_text(changed))
    assert not pattern.fullmatch(sd.grid_text(puzzle))                       # blanks (0) are not digits 1-9


def test_rule_violations_name_the_problem():
    _, solution = sd.puzzles(3, 1)[0]
    broken = solution.copy()
    broken[0], broken[1] = broken[1], broken[0]          # swaps within row 1: columns/boxes break
    assert any("column" in p for p in sd.rule_violations(broken))
    changed = solution.copy()
    puzzle = solution.copy()
    puzzle[0] = solution[0] % 9 + 1                       # a given the answer does not keep
    assert any("given" in p for p in sd.rule_violations(changed, puzzle))
    blank = solution.copy()
    blank[40] = 0
    assert any("not filled" in p for p in sd.rule_violations(blank))


def test_tokenizer_round_trip(bundled):
    tok = bundled.tokenizer
    puzzle, solution = sd.puzzles(2, 1)[0]
    text = sd.grid_text(puzzle)
    assert tok.encode(text) == sd.prompt_ids(puzzle)[1:-1].tolist()
    assert tok.encode(text.replace("0", ".")) == sd.prompt_ids(puzzle)[1:-1].tolist()
    assert tok.decode(sd.solution_ids(solution).tolist()) == sd.grid_text(solution)
    assert [tok.token_to_id(t) for t in sd.VOCAB] == list(range(len(sd.VOCAB)))
    assert tok.decode(sd.prompt_ids(puzzle).tolist()) == text          # specials are skipped
    assert bundled.config.vocab_size == len(sd.VOCAB)
    assert bundled.canvas_length == sd.CELLS


def test_grid_from_ids_blanks_non_digits():
    ids = np.full(81, sd.SEP)
    ids[0] = 9 + sd.DIGIT_OFFSET
    grid = sd.grid_from_ids(ids)
    assert grid[0] == 9 and not grid[1:].any()


def test_bundled_model_answers_every_puzzle_in_format(bundled):
    pairs = sd.test_set(2)
    result = sd.evaluate(bundled, pairs, seed=0, max_denoising_steps=8)
    assert result.puzzles == 2 and 1 <= result.mean_steps <= 8
    assert all(len(a) == 81 and a.isdigit() for a in result.answers)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_bundled_model_solves_fixed_easy_puzzles(bundled, index):
    """Held-out puzzles the bundled model solves under every seed tried (0-3) when it was bundled
    (the first six all are)."""
    puzzle, solution = sd.test_set(4)[index]
    result = sd.solve(bundled, puzzle, seed=0)
    assert result.solved, result.problems
    assert (result.grid == solution).all()


def test_solve_refuses_givens_that_break_a_rule(bundled):
    with pytest.raises(ConfigError, match=r"givens break the rules \(row 1 repeats a digit"):
        sd.solve(bundled, CONTRADICTION, seed=0, max_denoising_steps=4)


def test_cli_refuses_a_contradiction_before_running_the_model():
    out = CliRunner().invoke(main, ["sudoku", CONTRADICTION, "--steps", "4"])
    assert out.exit_code == 1
    assert "error: the puzzle's givens break the rules (row 1 repeats a digit" in out.output
    assert not [line for line in out.stdout.splitlines() if len(line) == 81 and line.isdigit()]


@pytest.mark.parametrize("args, message", [(["--eval", "100000000"], "--eval takes 1 to 10000 puzzles"),
                                           (["--eval", "0"], "--eval takes 1 to 10000 puzzles"),
                                           (["--seed", "-1"], "-1 is not in the range x>=0")])
def test_cli_bounds(args, message):
    out = CliRunner().invoke(main, ["sudoku", *args])
    assert out.exit_code != 0 and message in out.output and "Traceback" not in out.output


def test_cli_rejects_bad_puzzle():
    out = CliRunner().invoke(main, ["sudoku", "12345"])
    assert out.exit_code == 1 and "81 characters" in out.output


def test_cli_eval_scores_the_chosen_split():
    out = CliRunner().invoke(main, ["sudoku", "--eval", "2", "--split", "validation", "--steps", "4"])
    assert out.exit_code == 0, out.output
    assert "validation set: 2 easy puzzles" in out.output
    assert "solved " in out.stdout and "/2 (" in out.stdout


def test_transformers_reference_agrees():
    """bench/sudoku_reference.py: transformers under the deterministic stand-ins gives our answers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from sudoku_reference import pattern_noise, reference_evaluate

    pairs = sd.test_set(2)
    model = portable_dg.load(sd.default_model_path())
    ours = sd.evaluate(model, pairs, noise=pattern_noise(model.config.vocab_size), greedy=True,
                       max_denoising_steps=6)
    theirs = reference_evaluate(sd.default_model_path(), pairs, max_denoising_steps=6)
    assert ours.answers == theirs.answers and ours.mean_steps == theirs.mean_steps


def test_training_loss_decreases():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train_sudoku

    torch.set_num_threads(1)
    model = train_sudoku.build_model(dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                          layer_types=["sliding_attention", "full_attention"],
                                          num_attention_heads=2, head_dim=16, global_head_dim=16,
                                          num_experts=4, moe_intermediate_size=16))
    model.train()
    pool = {"easy": sd.puzzles(1, 4)}
    prompts, targets = (torch.from_numpy(a) for a in train_sudoku.batch(pool, ["easy"], 8, np.random.default_rng(0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = train_sudoku.diffusion_loss(model, prompts, targets, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_is_saved_loadable(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train_sudoku

    out = tmp_path / "ckpt"
    small = dict(hidden_size=32, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    train_sudoku.save_checkpoint(train_sudoku.build_model(small), out)
    train_sudoku.save_checkpoint(train_sudoku.build_model(small, seed=1), out)     # replaces it atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    model = portable_dg.load(out)
    assert model.tokenizer.decode(sd.solution_ids(np.arange(1, 10)).tolist()) == "123456789"


def test_tune_sampler_scores_and_writes_a_setting(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import tune_sampler

    result = tune_sampler.score(str(sd.default_model_path()), 2, 0.8, 1.2, 0.05)
    assert set(result) >= {"solve_rate", "cells_correct", "mean_steps"} and 0 <= result["solve_rate"] <= 1
    model_dir = tmp_path / "sudoku"
    shutil.copytree(sd.default_model_path(), model_dir)
    before = json.loads((model_dir / "generation_config.json").read_text())
    tune_sampler.write_best(model_dir, result)
    after = json.loads((model_dir / "generation_config.json").read_text())
    assert {k: v for k, v in after.items() if k not in ("t_min", "t_max", "sampler_config")} == \
        {k: v for k, v in before.items() if k not in ("t_min", "t_max", "sampler_config")}
    gen = portable_dg.load(model_dir).generation_config
    assert (gen.t_min, gen.t_max, gen.entropy_bound) == (0.8, 1.2, 0.05)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(p.name for p in sd.default_model_path().iterdir())
