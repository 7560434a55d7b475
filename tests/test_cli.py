"""The `pdg` CLI through click's runner: generate, info, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from portable_dg.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_generate_ids_is_seeded(tiny_a):
    args = ["generate", "--model", str(tiny_a), "--prompt-ids", "2,10,11,12", "--ids",
            "--max-new-tokens", "16", "--steps", "4"]
    first, again = run(*args, "--seed", "3"), run(*args, "--seed", "3")
    assert first.exit_code == 0, first.output
    ids = [int(t) for t in first.stdout.strip().split(",")]
    assert len(ids) <= 16 and all(0 <= t < 512 for t in ids)
    assert first.stdout == again.stdout
    assert run(*args, "--seed", "4").stdout != first.stdout


def test_generate_greedy_matches_api(tiny_a):
    import portable_dg

    result = run("generate", "--model", str(tiny_a), "--prompt-ids", "2,10,11", "--ids", "--greedy",
                 "--max-new-tokens", "16", "--seed", "0")
    model = portable_dg.load(tiny_a)
    out = portable_dg.generate(model, [2, 10, 11], max_new_tokens=16, greedy=True, seed=0)
    assert result.stdout.strip() == ",".join(map(str, out.ids))


def test_show_drafts_prints_every_step(tiny_a):
    result = run("generate", "--model", str(tiny_a), "--prompt-ids", "2,10", "--ids",
                 "--max-new-tokens", "16", "--steps", "3", "--show-drafts", "--seed", "1")
    assert result.exit_code == 0
    drafts = [line for line in result.stderr.splitlines() if line.startswith("[canvas 1 step")]
    assert 1 <= len(drafts) <= 3


def test_info_json(tiny_a):
    result = run("info", str(tiny_a), "--json")
    data = json.loads(result.stdout)
    assert data["format"] == "hf" and data["canvas_length"] == 16
    assert data["layers"] == {"total": 4, "sliding": 2, "full": 2, "sliding_window": 8}
    assert data["tensor_types"] == {"F32": 96 + 17}           # text + the 1-layer vision tower
    assert data["parameters"]["total"] > data["parameters"]["active_per_token"] > 0
    vision = data["vision"]
    assert vision["layers"] == 1 and vision["weights"] and vision["patch_size"] == 4
    with safe_open(tiny_a / "model.safetensors", "np") as f:
        tower = [f.get_tensor(n).size for n in f.keys() if ".vision_tower." in n or ".embed_vision." in n]
    assert vision["parameters"] == sum(tower) > 0
    text = run("info", str(tiny_a)).stdout
    assert "4 x width 32, top-2" in text
    assert "vision         1 layers, hidden 32, patch 4" in text


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/dir"], "no such file or directory"),
    (["generate", "--model", "TINY", "--prompt-ids", "2,x"], "comma-separated integers"),
    (["generate", "--model", "TINY", "--prompt-ids", "2,99999"], "token ids must lie in"),
    (["generate", "--model", "TINY", "--prompt", "hi"], "no tokenizer"),
    (["generate", "--model", "TINY", "--prompt-ids", "2", "--backend", "cuda9"], "unknown backend"),
    (["generate", "--model", "TINY", "--prompt-ids", "2", "--steps", "0"], "max_denoising_steps"),
    (["generate", "--model", "TINY", "--prompt-ids", "2", "--dtype", "int8"], "float32 or float64"),
])
def test_errors_are_one_line(tiny_a, args, message):
    args = [str(tiny_a) if a == "TINY" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1


def test_help_imports_no_heavy_backend():
    code = ("import sys; from click.testing import CliRunner; from portable_dg.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = {'torch', 'mlx', 'ggml', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_ids_within_vocab_via_numpy_float64(tiny_a):
    result = run("generate", "--model", str(tiny_a), "--prompt-ids", "2,10", "--ids",
                 "--max-new-tokens", "16", "--steps", "2", "--dtype", "float64", "--greedy")
    assert result.exit_code == 0
    assert np.all(np.array(result.stdout.strip().split(","), int) < 512)


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "Why is the sky blue?"], "needs a user message holding a puzzle"),
    (["generate", "--prompt-ids", "2", "--seed", "-1"], "'--seed': -1 is not in the range x>=0"),
    (["imatrix", "--model", "TINY", "--out", "OUT/im.npz", "--n-random", "0"], "--n-random must be positive"),
    (["imatrix", "--model", "TINY", "--out", "OUT/im.npz", "--prompts", "BLANK"], "calibration prompts are all blank"),
    (["eval", "--model", "TINY", "--reference", "TINY", "--seed", "-1"], "-1 is not in the range x>=0"),
    (["synth", "OUT/s", "--like", "tiny", "--seed", "-1"], "-1 is not in the range x>=0"),
])
def test_bad_options_are_refused_before_any_work(tiny_a, tmp_path, args, message):
    (tmp_path / "blank.txt").write_text("\n  \n")
    args = [{"TINY": str(tiny_a), "BLANK": str(tmp_path / "blank.txt")}.get(a, a.replace("OUT", str(tmp_path)))
            for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]


def test_file_outputs_need_force(tiny_a, tmp_path):
    out = tmp_path / "a.gguf"
    out.write_text("mine")
    refused = CliRunner().invoke(main, ["convert", str(tiny_a), str(out), "--to", "gguf", "--quant", "F32"])
    assert refused.exit_code == 1 and "a.gguf: already exists; pass --force to replace it" in refused.output
    assert out.read_text() == "mine"
    replaced = CliRunner().invoke(main, ["convert", str(tiny_a), str(out), "--to", "gguf", "--quant", "F32", "--force"])
    assert replaced.exit_code == 0 and out.read_bytes()[:4] == b"GGUF"
    assert "writing a.gguf: " in replaced.stderr and replaced.stderr.splitlines()[-1].endswith(", done")
    im = tmp_path / "im.npz"
    im.write_text("mine")
    refused = CliRunner().invoke(main, ["imatrix", "--model", str(tiny_a), "--out", str(im), "--n-random", "1"])
    assert refused.exit_code == 1 and "pass --force" in refused.output and im.read_text() == "mine"
    directory = CliRunner().invoke(main, ["convert", str(tiny_a), str(tmp_path / "d"), "--to", "mlx", "--force"])
    assert directory.exit_code == 1 and "never replaced" in directory.output


def test_empty_imatrix_is_refused(tiny_a, tmp_path):
    import numpy as np

    np.savez(tmp_path / "empty.npz")
    result = CliRunner().invoke(main, ["convert", str(tiny_a), str(tmp_path / "a.gguf"), "--to", "gguf",
                                       "--quant", "Q8_0", "--imatrix", str(tmp_path / "empty.npz")])
    assert result.exit_code == 1 and "the importance matrix is empty" in result.output
    assert not (tmp_path / "a.gguf").exists()
