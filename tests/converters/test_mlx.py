"""HF -> MLX conversion (mlx-vlm's diffusion_gemma layout) and reading MLX directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import portable_dg
from portable_dg.checkpoint import expected_tensors, open_checkpoint, open_safetensors
from portable_dg.cli import main
from portable_dg.converters import mlx as converter
from portable_dg.converters.mlx import MLXQuantized, convert_to_mlx, read_mlx
from portable_dg.errors import CheckpointError, ConfigError, FormatError, OutputError
from portable_dg.source import open_source, read_hf
from portable_dg.tokenizer import Tokenizer

mx = pytest.importorskip("mlx.core")

L0 = "model.decoder.layers.0."
L1 = "model.decoder.layers.1."
# tiny "a" (H 64, dense 96, experts 4 x 32, vocab 512) as q4 with groups of 32: name -> (dtype, shape).
# mlx-vlm's mix: 8-bit g64 for embedding/attention/dense MLP/router; 4-bit g32 for experts and the SC MLP;
# mlp.down_proj (input 96) is not a multiple of 64, so it stays float, as in mlx-lm.
Q4_LISTING = {
    "model.decoder.embed_tokens.weight": ("U32", [512, 16]),
    "model.decoder.embed_tokens.scales": ("F32", [512, 1]),
    "model.decoder.embed_tokens.biases": ("F32", [512, 1]),
    L0 + "self_attn.q_proj.weight": ("U32", [64, 16]),
    L1 + "self_attn.o_proj.weight": ("U32", [64, 32]),
    L1 + "self_attn.o_proj.scales": ("F32", [64, 2]),
    L0 + "experts.gate_up_proj.weight": ("U32", [4, 64, 8]),
    L0 + "experts.gate_up_proj.scales": ("F32", [4, 64, 2]),
    L0 + "experts.down_proj.weight": ("U32", [4, 64, 4]),
    L0 + "experts.down_proj.biases": ("F32", [4, 64, 1]),
    L0 + "router.proj.weight": ("U32", [4, 16]),
    L0 + "mlp.gate_proj.weight": ("U32", [96, 16]),
    L0 + "mlp.down_proj.weight": ("F32", [64, 96]),
    "model.decoder.self_conditioning.down_proj.weight": ("U32", [64, 12]),
    "model.decoder.self_conditioning.pre_norm.weight": ("F32", [64]),
    L0 + "router.scale": ("F32", [64]),
    L0 + "router.per_expert_scale": ("F32", [4]),
    L0 + "layer_scalar": ("F32", [1]),
    "model.encoder.language_model.layers.0.layer_scalar": ("F32", [1]),
    L0 + "input_layernorm.weight": ("F32", [64]),
}


def stored(directory: Path) -> dict[str, tuple[str, list[int]]]:
    return {n: (r.dtype, list(r.shape)) for n, r in open_checkpoint(directory).items()}


@pytest.fixture(scope="module")
def source(tiny_dir, tmp_path_factory) -> Path:
    """Tiny "a" plus a word-level tokenizer, a chat template and a tokenizer config."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    path = tmp_path_factory.mktemp("hf") / "tiny"
    shutil.copytree(tiny_dir("a"), path)
    vocab = {f"w{i}": i for i in range(512)}
    tok = HFTokenizer(WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w2", "eos_token": "w1"}))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return path


@pytest.fixture(scope="module")
def q4(source, tmp_path_factory) -> Path:
    return convert_to_mlx(source, tmp_path_factory.mktemp("out") / "q4", "q4", 32, mix="mlx-vlm",
                          progress=False)


def test_q4_layout(source, q4):
    names = stored(q4)
    for name, want in Q4_LISTING.items():
        assert names[name] == want, name
    assert not any(n.startswith("lm_head") or ".encoder.language_model.layers.0.self_attn" in n for n in names)
    assert any(n.startswith("model.encoder.vision_tower.") for n in names)   # copied as stored
    index = json.loads((q4 / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(names)
    assert index["metadata"]["total_size"] == sum((q4 / f).stat().st_size - header_size(q4 / f)
                                                 for f in set(index["weight_map"].values()))
    for name, shape in expected_tensors(read_hf(source).config).items():
        name = name + ".weight" if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else name
        assert name in names, name


def header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_q4_config_and_quantization_block(source, q4):
    config = json.loads((q4 / "config.json").read_text())
    block = config["quantization"]
    assert block == config["quantization_config"] and "_name_or_path" not in config
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert block[L0 + "self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert L0 + "experts.gate_up_proj" not in block and L0 + "mlp.down_proj" not in block
    assert open_safetensors(q4 / "model.safetensors") and \
        json.loads((q4 / "model.safetensors").read_bytes()[8:header_size(q4 / "model.safetensors")])[
            "__metadata__"] == {"format": "mlx"}


def test_q4_round_trip_keeps_tensors_config_and_tokenizer(source, q4):
    hf, back = read_hf(source), read_mlx(q4)
    assert back.format == "mlx" and back.generation == hf.generation
    # the same model; the config also spells the full-attention geometry the released way (for mlx-vlm)
    released = {"global_head_dim", "num_global_key_value_heads"}
    assert {k: v for k, v in vars(back.config).items() if k not in released} == \
        {k: v for k, v in vars(hf.config).items() if k not in released}
    assert (back.config.global_head_dim, back.config.num_global_key_value_heads) == (32, 1)
    assert sorted(back.tensors) == sorted(hf.tensors)
    for name in hf.tensors:
        original, value = np.asarray(hf.tensors[name]), back.tensors[name]
        if isinstance(value, MLXQuantized):
            q = mx.quantize(mx.array(original), group_size=value.group_size, bits=value.bits, mode=value.mode)
            want = mx.dequantize(*q, group_size=value.group_size, bits=value.bits, mode=value.mode)
            np.testing.assert_allclose(value.dequantize(), np.array(want), atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(value), original, err_msg=name)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (q4 / f).read_bytes() == (source / f).read_bytes(), f
    generation = json.loads((q4 / "generation_config.json").read_text())   # transformers' nulls resolved
    assert None not in generation.values() and generation["t_min"] == 0.4 and generation["max_denoising_steps"] == 8
    tok = Tokenizer.from_directory(q4)
    assert tok.encode("w5 w7 w9") == [5, 7, 9] and tok.chat_template == Tokenizer.from_directory(source).chat_template


@pytest.mark.parametrize("quant, dtype", [("none", "F32"), ("bf16", "BF16")])
def test_float_conversion_is_read_as_hf_with_mlx_names(source, tmp_path, quant, dtype):
    out = convert_to_mlx(source, tmp_path / quant, quant, progress=False)
    names = stored(out)
    assert names[L0 + "experts.gate_up_proj.weight"] == (dtype, [4, 64, 64])
    assert not any(n.endswith(".scales") for n in names)
    back = open_source(out)
    assert back.format == "hf"
    want = np.asarray(read_hf(source).tensors[L0 + "experts.gate_up_proj"])
    got = back.tensors[L0 + "experts.gate_up_proj"]
    np.testing.assert_allclose(got, want, rtol=0 if quant == "none" else 2 ** -8)


def test_mxfp4_keeps_high_precision_modules_affine(source, tmp_path):
    out = convert_to_mlx(source, tmp_path / "mx", "mxfp4", progress=False)
    names = stored(out)
    assert names[L0 + "experts.gate_up_proj.scales"] == ("U8", [4, 64, 2])
    assert L0 + "experts.gate_up_proj.biases" not in names
    assert names["model.decoder.embed_tokens.biases"] == ("F32", [512, 1])   # 8-bit affine
    assert read_mlx(out).tensors[L0 + "experts.down_proj"].qtype == "mxfp4g32"


def test_cli_convert_and_load(source, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["convert", str(source), str(out), "--to", "mlx", "--quant", "q8",
                                       "--group-size", "32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model = portable_dg.load(out, backend="mlx", dtype="float32")
    assert model.source.metadata["quantization"] == {"mode": "affine", "bits": 8, "group_size": 32}
    assert model.start([2, 3]).denoise(np.arange(16)).shape == (16, 512)


# --- a directory laid out like an mlx-community upload -------------------------------------------------
def build_community_dir(src: Path, out: Path) -> None:
    """What mlx-vlm writes for a 4-bit upload, built here with MLX's own writer: bf16 floats and
    scales, HF names with `.weight` on experts, 8-bit g64 entries without "mode", two shards."""
    out.mkdir()
    refs = open_checkpoint(src)
    weights = {}
    for name, ref in refs.items():
        if name.startswith("lm_head") or ("language_model" in name and "layer_scalar" not in name):
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            name += ".weight"
        weights[name] = mx.array(np.asarray(ref.load(), np.float32)).astype(mx.bfloat16)
    config = json.loads((src / "config.json").read_text())
    quantization = {"group_size": 64, "bits": 4}
    for name in sorted(weights):
        w, module = weights[name], name[:-len(".weight")]
        if not name.endswith(".weight") or w.ndim < 2 or "vision" in name or w.shape[-1] % 64:
            continue
        bits = 8 if (module.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
                     or ".self_attn." in module or "router" in module) else 4
        if bits == 8:
            quantization[module] = {"group_size": 64, "bits": 8}
        weights[name], weights[module + ".scales"], weights[module + ".biases"] = mx.quantize(
            w, group_size=64, bits=bits)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, part in shards.items():
        mx.save_safetensors(str(out / f), {n: weights[n] for n in part}, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": 0}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config.update(quantization=quantization, quantization_config=quantization)
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "generation_config.json", out)


def test_community_style_directory_loads_and_matches_numpy(source, tmp_path):
    out = tmp_path / "community"
    build_community_dir(source, out)
    back = read_mlx(out)
    assert back.tensors[L0 + "experts.gate_up_proj"].qtype == "affine4g64"
    assert back.tensors[L0 + "self_attn.q_proj.weight"].qtype == "affine8g64"
    canvas = (np.arange(16) * 5) % 512
    want = portable_dg.load(out, backend="numpy").start([2, 9, 4]).denoise(canvas)
    got = portable_dg.load(out, backend="mlx", dtype="float32").start([2, 9, 4]).denoise(canvas)
    assert np.abs(got - want).max() <= 1e-4


# --- bad input ----------------------------------------------------------------------------------------
def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("quant, group_size, message", [
    ("q3", None, "unsupported --quant 'q3'"), ("mxfp4", 64, "--group-size 64 is not valid for mxfp4"),
    ("bf16", 32, "--group-size applies to quantized modes only")])
def test_bad_options_write_nothing(source, tmp_path, quant, group_size, message):
    with pytest.raises(ConfigError, match=message):
        convert_to_mlx(source, tmp_path / "out", quant, group_size, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_destination_and_the_source(source, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        convert_to_mlx(source, tmp_path / "taken", "q4", progress=False)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="refusing to overwrite the source"):
        convert_to_mlx(source, source, "q4", progress=False)


def test_failure_mid_write_leaves_nothing(source, tmp_path, monkeypatch):
    calls = []

    def failing(p):
        calls.append(p.name)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(p)

    real = converter.encode
    monkeypatch.setattr(converter, "encode", failing)
    with pytest.raises(OutputError, match="out: cannot write: disk full; nothing was written"):
        convert_to_mlx(source, tmp_path / "out", "q4", 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_shard_is_named(source, tmp_path):
    out = convert_to_mlx(source, tmp_path / "sharded", "q4", 32, progress=False, max_shard_bytes=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) missing: {shards[1].name}"):
        portable_dg.load(out, backend="mlx")


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(bits=8), "experts.down_proj: the tensors do not match the quantization config"),
    (lambda q: q[L0 + "self_attn.q_proj"].update(group_size=32), "self_attn.q_proj: the tensors do not match"),
    (lambda q: q.update({L0 + "router.proj": False}), "router.proj has .scales but config.json"),
    (lambda q: q.update(mode="nvfp4"), "unsupported quantization mode='nvfp4'"),
])
def test_mismatched_quantization_config(q4, tmp_path, edit, message):
    out = tmp_path / "edited"
    shutil.copytree(q4, out)
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization"])
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=message):
        read_mlx(out)


def test_portable_mix_keeps_router_and_self_conditioning_float(source, tmp_path):
    out = convert_to_mlx(source, tmp_path / "portable", "q4", 32, progress=False)
    listing = stored(out)
    assert listing[L0 + "router.proj.weight"] == ("F32", [4, 64])
    assert listing["model.decoder.self_conditioning.down_proj.weight"] == ("F32", [64, 96])
    assert L0 + "router.proj.scales" not in listing
    assert listing[L0 + "experts.gate_up_proj.weight"] == Q4_LISTING[L0 + "experts.gate_up_proj.weight"]
    assert listing["model.decoder.embed_tokens.weight"] == ("U32", [512, 16])
    config = json.loads((out / "config.json").read_text())
    assert L0.rstrip(".") + ".router.proj" not in config["quantization"]
    with pytest.raises(ConfigError, match="mix"):
        convert_to_mlx(source, tmp_path / "bad", "q4", mix="gguf", progress=False)
