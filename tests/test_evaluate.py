"""pdg eval: KL / top-1 arithmetic, teacher forcing through the CLI, JSON schema, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from portable_dg import evaluate, synth
from portable_dg.cli import main


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The same random weights stored in f32 and in bf16."""
    root = tmp_path_factory.mktemp("eval")
    return (synth.write_synthetic(root / "f32", "tiny", dtype="f32"),
            synth.write_synthetic(root / "bf16", "tiny", dtype="bf16"))


def test_kl_divergence_known_values():
    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    expected = [0.0, 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)]
    np.testing.assert_allclose(evaluate.kl_divergence(p, q), expected, atol=1e-12)
    shifted = p + 7.0                                   # softmax is shift-invariant per row
    np.testing.assert_allclose(evaluate.kl_divergence(shifted, p), [0.0, 0.0], atol=1e-12)
    assert evaluate.kl_divergence(q, p)[1] > 0          # and KL is not symmetric
    assert evaluate.kl_divergence(q, p)[1] != pytest.approx(expected[1])


def test_top1_and_summary():
    a = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    b = np.array([[0.0, 5.0, 0.0], [0.0, 1.0, 0.0]])
    assert evaluate.top1_matches(a, b).tolist() == [True, False]
    s = evaluate.kl_summary(np.arange(101, dtype=float))
    assert s == {"mean": 50.0, "p99": 99.0, "max": 100.0}


def test_cli_same_model_is_exact(tiny_pair):
    f32, _ = tiny_pair
    result = CliRunner().invoke(main, ["eval", "--model", str(f32), "--reference", str(f32), "--prompts", "2",
                                       "--steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["schema"] == "portable_dg.eval/1" and r["positions"] == 2 * 3 * 16
    assert r["kl"] == {"mean": 0.0, "p99": 0.0, "max": 0.0} and r["top1_agreement"] == 1.0
    assert r["steps_per_canvas"] == {"model": 3.0, "reference": 3.0, "delta": 0.0}
    # progress off a terminal: plain lines on stderr, counting every denoising step of the three passes
    lines = result.stderr.splitlines()
    assert lines[0].startswith("eval: 0 steps of 18 steps (0%)")
    assert lines[-1].startswith("eval: 18 steps of 18 steps (100%)") and lines[-1].endswith(", done")


def test_cli_bf16_against_f32(tiny_pair):
    """Rounding the weights to bf16 shows up as a small but non-zero divergence."""
    f32, bf16 = tiny_pair
    result = CliRunner().invoke(main, ["eval", "--model", str(bf16), "--reference", str(f32), "--prompts", "2",
                                       "--canvases", "2", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "KL divergence (nats, 192 positions)" in result.output and "top-1 agreement" in result.output
    report = evaluate.evaluate(bf16, f32, settings=evaluate.EvalSettings(prompts=2, canvases=2, steps=3))
    assert 1e-5 < report["kl"]["mean"] < 0.05 and report["kl"]["mean"] <= report["kl"]["p99"] <= report["kl"]["max"]
    assert 0.8 < report["top1_agreement"] < 1.0


def test_cli_bad_input(tiny_pair, tmp_path):
    f32, _ = tiny_pair
    runner = CliRunner()
    missing = runner.invoke(main, ["eval", "--model", str(f32), "--reference", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no such file or directory" in missing.output
    no_reference = runner.invoke(main, ["eval", "--model", str(f32)])
    assert no_reference.exit_code == 2 and "--reference" in no_reference.output
    backend = runner.invoke(main, ["eval", "--model", str(f32), "--reference", str(f32), "--backend", "nope"])
    assert backend.exit_code == 1 and "unknown backend 'nope'" in backend.output
    other = synth.write_synthetic(tmp_path / "wide", "tiny", vocab=1024)
    mismatch = runner.invoke(main, ["eval", "--model", str(other), "--reference", str(f32)])
    assert mismatch.exit_code == 1 and "differ in vocab_size (1024 vs 512)" in mismatch.output
