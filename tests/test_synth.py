"""pdg synth: the streaming safetensors writer, the presets' shapes, loading by transformers and us."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import portable_dg
from portable_dg import synth
from portable_dg.checkpoint import expected_tensors, open_checkpoint, open_safetensors
from portable_dg.cli import main
from portable_dg.config import DiffusionGemmaConfig
from portable_dg.errors import ConfigError
from portable_dg.safetensors_writer import f32_to_bf16_bits


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return synth.write_synthetic(tmp_path_factory.mktemp("synth") / "tiny", "tiny", dtype="f32", seed=3)


def test_tiny_matches_transformers(tiny_f32):
    """transformers 5.23 loads the synthetic checkpoint and computes the same logits as we do."""
    torch = pytest.importorskip("torch")
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    ours = portable_dg.load(tiny_f32)
    assert ours.source.metadata["synthetic"] is True
    prompt, canvas = [2, 10, 11, 12, 13, 14, 15, 16, 17, 18], np.arange(20, 36)
    logits = ours.start(prompt).denoise(canvas)

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(str(tiny_f32), dtype=torch.float32).eval()
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    with torch.no_grad():
        ref.model.encoder(input_ids=torch.tensor([prompt]), past_key_values=cache)
        expected = ref(decoder_input_ids=torch.tensor(canvas)[None], past_key_values=cache).logits[0].numpy()
    assert np.abs(logits - expected).max() < 1e-4
    assert logits.std() > 0.1   # not a degenerate (constant) distribution


def test_config_forms_describe_the_same_model(tmp_path):
    per_layer = synth.config_json("tiny", synth.text_config("tiny"), "transformers", "f32")
    released = synth.config_json("tiny", synth.text_config("tiny"), "released", "f32")
    assert "per_layer_config" in per_layer["text_config"] and "global_head_dim" not in per_layer["text_config"]
    assert released["text_config"]["global_head_dim"] == 32 and "per_layer_config" not in released["text_config"]
    a, b = DiffusionGemmaConfig.from_dict(per_layer), DiffusionGemmaConfig.from_dict(released)
    assert a.layers == b.layers
    path = synth.write_synthetic(tmp_path / "released-form", "tiny", form="released")
    assert portable_dg.load(path).config.layers == a.layers


def test_released_preset_shapes_without_writing():
    """The released preset is spec §1/§2: 691 text tensors, 25.25 B parameters, ~50.5 GB bf16."""
    plan = synth.describe("released")
    assert plan["tensors"] == 691
    assert abs(plan["parameters"] / 1e9 - 25.25) < 0.01
    assert plan["bytes"] == 2 * plan["parameters"] and plan["shards"] == 11
    config = DiffusionGemmaConfig.from_dict(plan["config"])
    shapes = {t.name: t.shape for t in synth.tensor_plan(config)}
    assert shapes == expected_tensors(DiffusionGemmaConfig())   # the dataclass defaults are the release
    assert shapes["model.decoder.layers.5.self_attn.q_proj.weight"] == (8192, 2816)
    assert shapes["model.decoder.layers.0.experts.gate_up_proj"] == (128, 1408, 2816)
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in shapes


def test_released_one_layer_dry_run_cli():
    result = CliRunner().invoke(main, ["synth", "unused", "--like", "released", "--layers", "1",
                                       "--vocab", "1024", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    text = plan["config"]["text_config"]
    assert (plan["layers"], plan["vocab"], text["hidden_size"], text["num_experts"]) == (1, 1024, 2816, 128)
    assert text["layer_types"] == ["full_attention"] and text["per_layer_config"] == {"0": {
        "head_dim": 512, "num_key_value_heads": 2}}


def test_shards_headers_and_offsets(tmp_path, tiny_f32):
    """Small shards: an index covering every tensor, 8-byte-aligned headers, contiguous offsets,
    and the same values as the single-file checkpoint with the same seed."""
    out = synth.write_synthetic(tmp_path / "sharded", "tiny", dtype="f32", seed=3, max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        raw = (out / shard).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        spans = sorted(tuple(v["data_offsets"]) for v in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert 8 + n + spans[-1][1] == len(raw)
        assert len(raw) <= 300_000 + 8 + n or len(header) == 1
    sharded, single = open_checkpoint(out), open_safetensors(tiny_f32 / "model.safetensors")
    assert sorted(sharded) == sorted(single) == sorted(index["weight_map"])
    for name in single:
        np.testing.assert_array_equal(sharded[name].load(), single[name].load())


def test_safetensors_library_reads_bf16_output(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    out = synth.write_synthetic(tmp_path / "bf16", "tiny", dtype="bf16", seed=3)
    ours = open_safetensors(out / "model.safetensors")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name in ("model.decoder.embed_tokens.weight", "model.decoder.layers.1.experts.down_proj"):
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16
            np.testing.assert_array_equal(t.float().numpy(), ours[name].load())


def test_chunked_generation_gives_the_same_values(monkeypatch, tmp_path):
    """Writing in tiny chunks (the memory bound) does not change the values."""
    whole = synth.write_synthetic(tmp_path / "whole", "tiny", dtype="f32")
    monkeypatch.setattr(synth, "CHUNK_ELEMENTS", 100)
    chunked = synth.write_synthetic(tmp_path / "chunked", "tiny", dtype="f32")
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    x[:4] = [1.00390625, 1.01171875, -3.0e38, 0.0]          # ties to even, large, zero
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16_bits(x), expected)


def test_weights_are_not_trivial(tiny_f32):
    refs = open_safetensors(tiny_f32 / "model.safetensors")
    norm = refs["model.decoder.layers.0.input_layernorm.weight"].load()
    assert abs(norm.mean() - 1) < 0.1 and 0.1 < norm.std() < 0.3
    scalars = [refs[f"model.decoder.layers.{i}.layer_scalar"].load()[0] for i in range(4)]
    assert len(set(scalars)) == 4
    q = refs["model.decoder.layers.0.self_attn.q_proj.weight"].load()
    assert abs(q.std() * np.sqrt(q.shape[1]) - 1) < 0.1


def test_tokenizer_and_generation_config(tiny_f32):
    model = portable_dg.load(tiny_f32)
    tok = model.tokenizer
    assert tok.vocab_size == 512
    ids = tok.encode("<|turn>user\nhé<turn|>")
    assert ids[0] == 105 and ids[-1] == 106
    assert tok.decode(ids) == "user\nhé"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|turn>model\n")
    assert model.generation_config.max_denoising_steps == 8 and model.generation_config.entropy_bound == 0.1


def test_refuses_existing_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        synth.write_synthetic(out, "tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_bad_input_cli(tmp_path):
    runner = CliRunner()
    bad_preset = runner.invoke(main, ["synth", str(tmp_path / "x"), "--like", "huge"])
    assert bad_preset.exit_code == 2 and "huge" in bad_preset.output
    small_vocab = runner.invoke(main, ["synth", str(tmp_path / "y"), "--like", "tiny", "--vocab", "100"])
    assert small_vocab.exit_code == 1 and "--vocab must be at least 512" in small_vocab.output
    assert not (tmp_path / "y").exists()


def test_cli_progress_in_a_log(tmp_path):
    """Off a terminal, `pdg synth` reports the bytes written as plain lines."""
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "s"), "--like", "tiny"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("synth s (tiny): 0 B of ")
    assert "(100%)" in lines[-1] and lines[-1].endswith(", done")


@pytest.mark.parametrize("target, quant", [("gguf", "Q8_0"), ("mlx", "q8"), ("torch", "fp8")])
def test_synthetic_marker_survives_conversion(tmp_path, target, quant):
    pytest.importorskip({"gguf": "ggml", "mlx": "mlx.core", "torch": "torch"}[target])
    src = synth.write_synthetic(tmp_path / "src", "tiny", dtype="f32")
    out = tmp_path / ("out.gguf" if target == "gguf" else "out")
    result = CliRunner().invoke(main, ["convert", str(src), str(out), "--to", target, "--quant", quant])
    assert result.exit_code == 0, result.output
    assert portable_dg.source.open_source(out).metadata["synthetic"] is True
    assert "SYNTHETIC" in CliRunner().invoke(main, ["info", str(out)]).stdout.splitlines()[0]
