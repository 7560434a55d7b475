"""pdg bench: metric arithmetic, the FLOP count, the JSON schema, transformers comparison, bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from portable_dg import bench, synth
from portable_dg.checkpoint import expected_tensors
from portable_dg.cli import main
from portable_dg.config import DiffusionGemmaConfig, GenerationConfig
from portable_dg.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth.write_synthetic(tmp_path_factory.mktemp("bench") / "tiny", "tiny", dtype="f32")


def test_run_metrics_arithmetic():
    run = bench.RunTiming(prefill_s=0.5, canvas_s=[2.0, 1.0], steps=[16, 8], wall_s=4.0)
    m = bench.run_metrics(run, prompt_len=100, new_tokens=300, canvas_length=256)
    assert m == {"visible_tok_s": 75.0, "canvas_tok_s": 512 / 3.0, "steps_per_canvas": 12.0,
                 "time_to_first_canvas_s": 2.5, "prefill_tok_s": 200.0, "ms_per_step": 125.0}


def test_summaries():
    assert bench.summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    runs = [dict.fromkeys(bench.METRICS, v) for v in (1.0, 5.0, 2.0)]
    assert bench.summarize_runs(runs)["ms_per_step"] == {"median": 2.0, "min": 1.0, "max": 5.0}


def test_timing_from_reference_events():
    """Canvas k spans the end of encoder call k to the start of encoder call k + 1."""
    events = [("enc", 1.0), ("enc_end", 2.0), ("dec", 2.1), ("dec", 2.5), ("dec", 2.9),
              ("enc", 3.0), ("enc_end", 3.5), ("dec", 3.6), ("dec", 4.0)]
    t = bench.timing_from_events(events, start=0.5, end=4.5)
    assert t.prefill_s == 1.5 and t.canvas_s == [1.0, 1.0] and t.steps == [3, 2] and t.wall_s == 4.0


def test_fixed_steps_turn_early_stop_off():
    base = GenerationConfig(max_denoising_steps=48, stability_threshold=1)
    fixed = bench.sampler_config(base, bench.BenchSettings(steps="fixed:16"))
    assert (fixed.max_denoising_steps, fixed.stability_threshold) == (16, 17)
    assert bench.sampler_config(base, bench.BenchSettings(steps="adaptive")) is base
    for bad in ("fixed:0", "fixed", "16", "adaptive:3"):
        with pytest.raises(ConfigError, match="fixed:N"):
            bench.BenchSettings(steps=bad)
    with pytest.raises(ConfigError, match="repeat"):
        bench.BenchSettings(repeat=0)


def test_step_flops_counts_every_product():
    """Independent count: 2 * L * (weights every token uses + k/E of the expert weights) plus the
    LM head, the soft embedding, and attention over [cache ; canvas]."""
    cfg = DiffusionGemmaConfig.from_dict(synth.config_json("tiny", synth.text_config("tiny"), "transformers", "f32"))
    L, context = cfg.canvas_length, 5
    dense = experts = 0
    for name, shape in expected_tensors(cfg).items():
        if len(shape) < 2 or name.endswith("embed_tokens.weight"):
            continue
        n = shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)
        if ".experts." in name:
            experts += n
        else:
            dense += n
    attention = sum(2 * L * (context + L) * cfg.num_attention_heads * g.head_dim for g in cfg.layers)
    head = cfg.vocab_size * cfg.hidden_size
    expected = 2 * (L * (dense + experts * cfg.top_k_experts / cfg.num_experts + 2 * head) + attention)
    assert bench.step_flops(cfg, context) == pytest.approx(expected)
    sc_mlp = 3 * cfg.intermediate_size * cfg.hidden_size
    assert bench.step_flops(cfg, context, self_conditioning=False) == pytest.approx(
        expected - 2 * L * (head + sc_mlp))


def test_memory_bound():
    cfg = DiffusionGemmaConfig.from_dict(synth.config_json("tiny", synth.text_config("tiny"), "transformers", "f32"))
    report = bench.memory_report(peak_host=2000, peak_device=None, weights=1000, cfg=cfg)
    assert report["logits_bytes"] == 16 * 512 * 4 and report["bound_bytes"] == 1100 + 2 * 16 * 512 * 4
    assert report["within_bound"]
    assert not bench.memory_report(80_000, None, 1000, cfg)["within_bound"]
    assert bench.memory_report(80_000, None, 1000, cfg, batch=2)["within_bound"]


def test_cli_json_schema(tiny):
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny), "--new-tokens", "20", "--steps", "fixed:3",
                                       "--repeat", "2", "--warmup", "1", "--prompt-len", "9", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["schema"] == "portable_dg.bench/1" and r["backend"] == "numpy" and r["synthetic"] is True
    assert r["settings"]["canvases"] == 2 and r["settings"]["max_denoising_steps"] == 3
    assert set(r["metrics"]) == set(bench.METRICS) and len(r["runs"]) == 2
    assert r["metrics"]["steps_per_canvas"] == {"median": 3.0, "min": 3.0, "max": 3.0}
    for stats in r["metrics"].values():
        assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert r["memory"]["peak_host_bytes"] > r["memory"]["checkpoint_bytes"] > 0
    assert r["reference"] is None and r["ratio"] is None


def test_cli_compare_transformers_table(tiny):
    """The reference runs in a child process with the same settings; the stability trick keeps
    transformers at exactly the fixed number of steps too."""
    pytest.importorskip("transformers")
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny), "--new-tokens", "16", "--steps", "fixed:2",
                                       "--repeat", "1", "--warmup", "0", "--compare", "transformers", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    ref = r["reference"]
    assert ref["metrics"]["steps_per_canvas"]["median"] == 2.0 and len(ref["runs"]) == 1
    assert ref["implementation"].startswith("transformers")
    assert r["ratio"]["canvas_tok_s"] == pytest.approx(
        r["metrics"]["canvas_tok_s"]["median"] / ref["metrics"]["canvas_tok_s"]["median"])
    table = bench.format_table(r)
    assert "transformers" in table and "ratio vs transformers" in table and "ms_per_step" in table


def test_cli_threads(tiny):
    """--threads reaches backends that take a count (ggml's n_threads) and is refused by those
    that cannot change theirs after start."""
    pytest.importorskip("ggml")
    runner = CliRunner()
    args = ["bench", "--model", str(tiny), "--new-tokens", "16", "--steps", "fixed:2", "--repeat", "1",
            "--warmup", "0", "--prompt-len", "5", "--json"]
    result = runner.invoke(main, args + ["--backend", "ggml", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["threads"] == 1
    refused = runner.invoke(main, args + ["--threads", "2"])
    assert refused.exit_code == 1 and "numpy backend takes no thread count" in refused.output
    zero = runner.invoke(main, args + ["--backend", "ggml", "--threads", "0"])
    assert zero.exit_code == 1 and "threads must be positive" in zero.output


def test_cli_bad_input(tiny, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(main, ["bench", "--model", str(tiny), "--backend", "nope"])
    assert unknown.exit_code == 1 and "unknown backend 'nope'" in unknown.output
    steps = runner.invoke(main, ["bench", "--model", str(tiny), "--steps", "some"])
    assert steps.exit_code == 1 and "fixed:N" in steps.output
    quant = runner.invoke(main, ["bench", "--model", str(tiny), "--quant", "Q8_0"])
    assert quant.exit_code == 1 and "--quant needs a backend" in quant.output
    missing = runner.invoke(main, ["bench", "--model", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no such file or directory" in missing.output
