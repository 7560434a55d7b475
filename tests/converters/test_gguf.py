"""GGUF conversion, quantization and reading (spec/file_formats.md §1)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("ggml")

import portable_dg  # noqa: E402
from portable_dg.backends.numpy import NumpyBackend  # noqa: E402
from portable_dg.checkpoint import expected_tensors  # noqa: E402
from portable_dg.config import DiffusionGemmaConfig  # noqa: E402
from portable_dg.converters.gguf import (GGUFTensor, convert_to_gguf, describe_gguf, read_gguf,  # noqa: E402
                                         requantize_gguf)
from portable_dg.converters.gguf_quant import ggml_quantize  # noqa: E402
from portable_dg.errors import ConfigError, FormatError  # noqa: E402
from portable_dg.runtime import Model  # noqa: E402
from portable_dg.sampler import generate  # noqa: E402

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M", "Q5_K_M")

# A checkpoint with 256-multiple rows, so the K-quants run as K-quants (the 96-wide expert down
# projection and the 128-wide sliding o_proj take llama.cpp's fallbacks, like 704/2112 do).
K256 = dict(model_type="diffusion_gemma_text", vocab_size=512, hidden_size=256, intermediate_size=512,
            moe_intermediate_size=96, num_experts=4, top_k_experts=4, num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"], num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
            sliding_window=8, canvas_length=16, eos_token_id=[1], pad_token_id=0, bos_token_id=2)


def write_k256(path: Path, seed: int = 0) -> Path:
    """Random weights with unit-variance-preserving matrices, norms and scalars away from 1.

    Every expert is used (top-k = E) and q/k norms are small, so the network is smooth: a
    quantization error moves the logits in proportion instead of flipping a routing or attention
    choice, and the quality bounds below can be tight."""
    from safetensors.numpy import save_file

    cfg = DiffusionGemmaConfig.from_dict(K256)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_tensors(cfg).items():
        if len(shape) == 1:   # small q/k norms keep attention (scale 1.0) from being one-hot
            base = (0.5 if name.endswith("layer_scalar")
                    else 0.25 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0)
            tensors[name] = (base + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = 0.1 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
            tensors[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(K256))
    (path / "generation_config.json").write_text(json.dumps(
        {"max_new_tokens": 32, "max_denoising_steps": 6, "eos_token_id": [1], "pad_token_id": 0}))
    return path


@pytest.fixture(scope="session")
def k256_dir(tmp_path_factory) -> Path:
    return write_k256(tmp_path_factory.mktemp("k256"))


@pytest.fixture(scope="session")
def gguf_of(tmp_path_factory, tiny_dir, k256_dir):
    """Factory: gguf_of(checkpoint "a"/"b"/"c"/"k256", quant) -> a converted file (cached)."""
    made: dict[tuple[str, str], Path] = {}

    def make(name: str, quant: str) -> Path:
        if (name, quant) not in made:
            src = k256_dir if name == "k256" else tiny_dir(name)
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{quant}.gguf"
            made[name, quant] = convert_to_gguf(src, out, quant, progress=False)
        return made[name, quant]
    return make


def canvas_logits(model: Model, seed: int = 0) -> np.ndarray:
    """Logits [2 * 2L, V]: two prompts, a first step and a self-conditioned second step each."""
    rng = np.random.default_rng(seed)
    V, L = model.config.vocab_size, model.canvas_length
    out = []
    for _ in range(2):
        ctx = model.start(rng.integers(0, V, 12))
        canvas = rng.integers(0, V, L)
        first = ctx.denoise(canvas)
        out += [first, ctx.denoise(canvas, first / 0.8)]
    return np.concatenate(out).astype(np.float64)


def kl_and_top1(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || other) of the softmax distributions per position, and top-1 agreement."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == other.argmax(-1)).mean())


# --- writing: every type round-trips through gguf-py ---------------------------------------------

@pytest.mark.parametrize("quant", TYPES)
def test_every_type_reads_back_with_gguf_py(gguf_of, k256_dir, quant):
    path = gguf_of("k256", quant)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "diffusion-gemma"
    assert fields["diffusion.canvas_length"] == 16
    assert fields["diffusion-gemma.attention.head_count_kv"] == [1, 1]
    assert fields["diffusion-gemma.attention.sliding_window_pattern"] == [True, False]
    assert fields["diffusion-gemma.attention.key_length"] == 128
    assert fields["diffusion-gemma.attention.key_length_swa"] == 64
    assert fields["diffusion-gemma.attention.causal"] is False
    assert fields["diffusion.eb_max_steps"] == 6
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == 2 * 22 + 1 + 7                      # 23 per sliding layer, 22 per full
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.1.ffn_down_exps.scale"] == "F32"
    assert "blk.1.attn_v.weight" not in types
    ne = {t.name: t.shape.tolist() for t in reader.tensors}
    assert ne["blk.0.ffn_gate_up_exps.weight"] == [256, 192, 4]
    assert ne["blk.0.ffn_down_exps.weight"] == [96, 256, 4]
    assert ne["rope_freqs.weight"] == [64]
    values = reader.tensors[[t.name for t in reader.tensors].index("rope_freqs.weight")].data
    assert (values[:16] == 1).all() and (values[16:] == np.float32(1e30)).all()
    expected = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
    assert types["blk.0.ffn_gate_up_exps.weight"] == expected.get(quant, quant)


def test_type_choice_follows_llama_cpp(gguf_of):
    q4km = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_of("k256", "Q4_K_M")).tensors}
    assert q4km["token_embd.weight"] == "Q6_K"           # the tied embedding counts as the output
    assert q4km["blk.1.ffn_down.weight"] == "Q6_K"       # use_more_bits(1, 2): a "more bits" layer
    assert q4km["blk.0.ffn_down.weight"] == "Q4_K"
    assert q4km["blk.1.ffn_down_exps.weight"] == "Q8_0"  # Q6_K on 96-wide rows -> Q8_0 fallback
    assert q4km["blk.0.ffn_down_exps.weight"] == "Q5_0"  # Q4_K on 96-wide rows -> Q5_0 fallback
    assert q4km["blk.0.attn_v.weight"] == "Q6_K"         # the only attn_v: first of one
    assert q4km["blk.0.attn_output.weight"] == "Q5_0"    # Q4_K on 128-wide rows -> Q5_0 fallback
    q5k = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_of("k256", "Q5_K")).tensors}
    assert q5k["blk.1.ffn_down_exps.weight"] == "Q5_1" and q5k["blk.1.attn_output.weight"] == "Q5_K"


def test_q8_0_blocks_match_gguf_py_bit_for_bit():
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    assert (ggml_quantize(x, "Q8_0") == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)).all()


def test_output_is_atomic_and_never_the_source(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown quantization type"):
        convert_to_gguf(tiny_dir("a"), tmp_path / "x.gguf", "Q9_9", progress=False)
    assert list(tmp_path.iterdir()) == []
    src = tmp_path / "a.gguf"
    convert_to_gguf(tiny_dir("a"), src, "F16", progress=False)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        requantize_gguf(src, src, "Q8_0", progress=False)


def test_describe(gguf_of):
    d = describe_gguf(gguf_of("k256", "Q8_0"))
    assert d["architecture"] == "diffusion-gemma" and d["file_type"] == 7
    assert set(d["types"]) == {"Q8_0", "F32"}
    assert 8.0 < d["bits_per_weight"] < 9.0


# --- reading: F32 conformance and quantized quality ------------------------------------------

@pytest.mark.parametrize("name", ["a", "b"])
def test_f32_gguf_matches_the_checkpoint(tiny_dir, gguf_of, name):
    ref, ours = portable_dg.load(tiny_dir(name)), portable_dg.load(gguf_of(name, "F32"))
    assert ours.config.layers == ref.config.layers
    assert np.abs(canvas_logits(ref) - canvas_logits(ours)).max() <= 1e-4
    kw = dict(max_new_tokens=2 * ref.canvas_length, max_denoising_steps=4, seed=3)
    assert (generate(ref, [5, 6, 7], greedy=True, **kw).sequences
            == generate(ours, [5, 6, 7], greedy=True, **kw).sequences).all()
    assert ours.generation_config.max_denoising_steps == 8 and ours.generation_config.t_min == 0.4


# (type, KL bound, top-1 bound) on the 256-wide checkpoint; measured KL: Q8_0 1.8e-4, Q6_K 1.8e-3,
# Q4_K_M 1.6e-2 (top-1 1.0).  A 25% scale error gives KL >= 0.1, shifted rows >= 1.1.
QUALITY = [("Q8_0", 5e-4, 0.98), ("Q6_K", 4e-3, 0.98), ("Q4_K_M", 3e-2, 0.98)]


@pytest.fixture(scope="module")
def k256_reference(k256_dir):
    return canvas_logits(portable_dg.load(k256_dir))


@pytest.mark.parametrize("quant,kl_bound,top1_bound", QUALITY)
def test_quantized_canvas_distributions(gguf_of, k256_reference, quant, kl_bound, top1_bound):
    source = read_gguf(gguf_of("k256", quant))
    kl, top1 = kl_and_top1(k256_reference, canvas_logits(Model(source, NumpyBackend())))
    assert kl < kl_bound and top1 >= top1_bound, (kl, top1)
    for broken in (rolled_rows, scaled):   # a wrong block layout or scale must break the bounds
        kl, top1 = kl_and_top1(k256_reference, canvas_logits(Model(broken(source), NumpyBackend())))
        assert kl > 3 * kl_bound, (broken.__name__, kl)


def rolled_rows(source):
    """Each quantized matrix with its rows shifted by one (a wrong row/block layout)."""
    return _with_matrices(source, lambda t: np.roll(t.data, 1, axis=-2))


def scaled(source):
    """Each quantized matrix dequantized with a 25% wrong scale."""
    return _with_matrices(source, None)


def _with_matrices(source, move):
    import dataclasses
    tensors = {}
    for name, t in source.tensors.items():
        if isinstance(t, GGUFTensor):
            t = GGUFTensor(t.name, t.shape, t.qtype, t.ggml_type, move(t)) if move else 1.25 * t.dequantize()
        tensors[name] = t
    return dataclasses.replace(source, tensors=tensors)


def test_quantized_tensor_objects(gguf_of):
    t = read_gguf(gguf_of("k256", "Q4_K_M")).tensors["model.decoder.layers.0.experts.gate_up_proj"]
    assert isinstance(t, GGUFTensor) and t.qtype == "Q4_K" and t.ggml_type == 12
    assert t.shape == (4, 192, 256) and t.data.dtype == np.uint8 and t.data.shape == (4, 192, 144)
    assert t.dequantize().shape == (4, 192, 256)


def test_requantize_matches_direct_conversion(gguf_of, tmp_path):
    out = requantize_gguf(gguf_of("k256", "F32"), tmp_path / "q.gguf", "Q4_K_M", progress=False)
    direct = {t.name: bytes(t.data) for t in gguf.GGUFReader(gguf_of("k256", "Q4_K_M")).tensors}
    again = {t.name: bytes(t.data) for t in gguf.GGUFReader(out).tensors}
    assert again == direct
    with pytest.raises(ConfigError, match="requantizing needs"):
        requantize_gguf(out, tmp_path / "qq.gguf", "Q8_0", progress=False)


def test_imatrix_is_used_and_threads_change_no_byte(k256_dir, tmp_path):
    """Rows are quantized independently: the same file on 1 thread and on 3 (chunks of one tensor
    and of one expert quantized at once), with an importance matrix per expert too."""
    from portable_dg.converters.gguf_imatrix import compute_imatrix

    imatrix = compute_imatrix(k256_dir, tmp_path / "im.npz", n_random=2, steps=2, progress=False)
    with np.load(imatrix) as z:
        assert z["blk.0.ffn_gate_up_exps.weight"].shape == (4, 256)
        assert z["token_embd.weight"].shape == (256,) and (z["blk.0.attn_q.weight"] > 0).all()
    plain = convert_to_gguf(k256_dir, tmp_path / "plain.gguf", "Q4_K", progress=False)
    weighted = convert_to_gguf(k256_dir, tmp_path / "im.gguf", "Q4_K", imatrix=imatrix, progress=False, threads=1)
    name = "blk.0.attn_q.weight"
    data = [next(t.data for t in gguf.GGUFReader(p).tensors if t.name == name) for p in (plain, weighted)]
    assert (data[0] != data[1]).any()
    threaded = convert_to_gguf(k256_dir, tmp_path / "im3.gguf", "Q4_K", imatrix=imatrix, progress=False, threads=3)
    assert threaded.read_bytes() == weighted.read_bytes()


# --- files laid out like Unsloth's (PR #24423) and PR #24427's ------------------------------------

# file_formats.md §1.6, written out independently of converters/gguf_names.py
UNSLOTH_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight", "layer_scalar": "layer_output_scale.weight",
}
UNSLOTH_GLOBALS = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                   "self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
                   "self_conditioning.gate_proj.weight": "self_cond_gate.weight",
                   "self_conditioning.up_proj.weight": "self_cond_up.weight",
                   "self_conditioning.down_proj.weight": "self_cond_down.weight"}


def build_unsloth_like(src: Path, out: Path, *, arch: str = "diffusion-gemma", pr24427: bool = False,
                       drop: str | None = None, reshape: str | None = None, int8: str | None = None) -> Path:
    """A GGUF written with gguf-py directly from the §1 tables: Q8_0 matrices, Q5_0 expert down
    projections, F32 vectors and router; no tokenizer.huggingface.json, eos list or vocab_size key.
    pr24427: self_cond_norm name, no encoder scalars, no diffusion.* keys."""
    from safetensors.numpy import load_file
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    hf = load_file(str(src / "model.safetensors"))
    named = {}
    for key, value in hf.items():
        if key.startswith("model.decoder.layers."):
            i, suffix = key[len("model.decoder.layers."):].split(".", 1)
            named[f"blk.{i}.{UNSLOTH_NAMES[suffix]}"] = value
        elif key.startswith("model.decoder.") and key[len("model.decoder."):] in UNSLOTH_GLOBALS:
            named[UNSLOTH_GLOBALS[key[len("model.decoder."):]]] = value
        elif key.startswith("model.encoder.language_model.layers.") and key.endswith("layer_scalar"):
            if not pr24427:
                named[f"blk.{key.split('.')[4]}.enc_layer_output_scale.weight"] = value
    if pr24427:
        named["self_cond_norm.weight"] = named.pop("self_cond_pre_norm.weight")
    n_rot = int(0.25 * text["global_head_dim"] // 2)
    named["rope_freqs.weight"] = np.array([1.0] * n_rot + [1e30] * (text["global_head_dim"] // 2 - n_rot),
                                          np.float32)
    pattern = [t == "sliding_attention" for t in text["layer_types"]]
    w = gguf.GGUFWriter(str(out), arch)
    a = arch
    w.add_uint32(f"{a}.context_length", 4096)
    w.add_uint32(f"{a}.embedding_length", text["hidden_size"])
    w.add_uint32(f"{a}.block_count", text["num_hidden_layers"])
    w.add_uint32(f"{a}.feed_forward_length", text["intermediate_size"])
    w.add_uint32(f"{a}.expert_feed_forward_length", text["moe_intermediate_size"])
    w.add_uint32(f"{a}.expert_count", text["num_experts"])
    w.add_uint32(f"{a}.expert_used_count", text["top_k_experts"])
    w.add_uint32(f"{a}.attention.head_count", text["num_attention_heads"])
    w.add_array(f"{a}.attention.head_count_kv", [text["num_key_value_heads"] if s else
                                                 text["num_global_key_value_heads"] for s in pattern])
    w.add_uint32(f"{a}.attention.key_length", text["global_head_dim"])
    w.add_uint32(f"{a}.attention.value_length", text["global_head_dim"])
    w.add_uint32(f"{a}.attention.key_length_swa", text["head_dim"])
    w.add_uint32(f"{a}.attention.value_length_swa", text["head_dim"])
    w.add_uint32(f"{a}.attention.sliding_window", text["sliding_window"])
    w.add_array(f"{a}.attention.sliding_window_pattern", pattern)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 1e6)
    w.add_float32(f"{a}.rope.freq_base_swa", 1e4)
    w.add_uint32(f"{a}.rope.dimension_count", text["global_head_dim"])
    w.add_float32(f"{a}.final_logit_softcapping", 30.0)
    if not pr24427:
        w.add_bool(f"{a}.attention.causal", False)
        w.add_uint32("diffusion.canvas_length", cfg["canvas_length"])
        w.add_uint32("diffusion.eb_max_steps", 5)
    for name, value in named.items():
        if name == drop:
            continue
        if name == int8:
            w.add_tensor(name, value.astype(np.int8))
        elif name == reshape:
            w.add_tensor(name, value[..., :-1].astype(np.float32))
        elif value.ndim == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, value.astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType.Q5_0 if "down_exps" in name else gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_unsloth_layout_loads_and_generates(k256_dir, tmp_path):
    path = build_unsloth_like(k256_dir, tmp_path / "unsloth.gguf")
    model = portable_dg.load(path)
    assert model.generation_config.max_denoising_steps == 5 and model.config.canvas_length == 16
    assert model.config.eos_token_id == [1, 106, 50]                     # spec §1.5 fallback
    kl, top1 = kl_and_top1(canvas_logits(portable_dg.load(k256_dir)), canvas_logits(model))
    assert kl < 2e-3 and top1 >= 0.98
    out = generate(model, [5, 6, 7], max_new_tokens=16, max_denoising_steps=3, seed=0)
    assert out.sequences.shape == (1, 3 + 16)


def test_pr24427_variant(k256_dir, tmp_path):
    path = build_unsloth_like(k256_dir, tmp_path / "pr24427.gguf", arch="diffusion-gemma4", pr24427=True)
    source = read_gguf(path)
    assert source.config.canvas_length == 256                           # no key: the default
    for i in range(2):
        enc = source.tensors[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        assert (enc == source.tensors[f"model.decoder.layers.{i}.layer_scalar"]).all()
    assert source.tensors["model.decoder.self_conditioning.pre_norm.weight"].shape == (256,)


# --- bad input -------------------------------------------------------------------------------

def test_truncated_file(gguf_of, tmp_path):
    path = gguf_of("a", "Q8_0")
    data = path.read_bytes()
    last = max(t.data_offset for t in gguf.GGUFReader(path).tensors)
    for cut in (10, 200, len(data) // 2, last + 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated|corrupt"):
            read_gguf(bad)


def test_wrong_magic_and_version(gguf_of, tmp_path):
    data = bytearray(gguf_of("a", "Q8_0").read_bytes())
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(FormatError, match="not a GGUF file"):
        read_gguf(tmp_path / "magic.gguf")
    (tmp_path / "version.gguf").write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    with pytest.raises(FormatError, match="version 99"):
        read_gguf(tmp_path / "version.gguf")


def test_wrong_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="general.architecture is 'llama'"):
        read_gguf(tmp_path / "llama.gguf")


@pytest.mark.parametrize("kind,match", [("drop", "missing tensor blk.1.attn_q.weight"),
                                        ("reshape", "blk.0.ffn_up.weight has HF shape"),
                                        ("int8", "blk.0.attn_k.weight has type I8")])
def test_missing_misshaped_or_unsupported_tensor(k256_dir, tmp_path, kind, match):
    target = {"drop": "blk.1.attn_q.weight", "reshape": "blk.0.ffn_up.weight", "int8": "blk.0.attn_k.weight"}
    path = build_unsloth_like(k256_dir, tmp_path / "bad.gguf", **{kind: target[kind]})
    with pytest.raises(FormatError, match=match):
        read_gguf(path)


def test_absurd_sizes_are_not_allocated(gguf_of, tmp_path):
    data = bytearray(gguf_of("a", "Q8_0").read_bytes())
    huge_counts = data[:8] + struct.pack("<QQ", 1 << 60, 1 << 60) + data[24:]
    (tmp_path / "counts.gguf").write_bytes(huge_counts)
    with pytest.raises(FormatError, match="more than a"):
        read_gguf(tmp_path / "counts.gguf")
    # the first key's length claims 2^62 bytes
    (tmp_path / "key.gguf").write_bytes(data[:24] + struct.pack("<Q", 1 << 62) + data[32:])
    with pytest.raises(FormatError):
        read_gguf(tmp_path / "key.gguf")
    # the first tensor's first dimension claims 2^40 values
    reader = gguf.GGUFReader(gguf_of("a", "Q8_0"))
    first = reader.tensors[0].field
    dims_at = first.offset + 8 + len(first.parts[1]) + 4
    (tmp_path / "dims.gguf").write_bytes(data[:dims_at] + struct.pack("<Q", 1 << 40) + data[dims_at + 8:])
    with pytest.raises(FormatError):
        read_gguf(tmp_path / "dims.gguf")
    # its second dimension overwritten with 0xFFFFFFFF: a row count no file can hold
    rows_at = dims_at + 8
    (tmp_path / "ffff.gguf").write_bytes(data[:rows_at] + struct.pack("<Q", 0xFFFFFFFF) + data[rows_at + 8:])
    with pytest.raises(FormatError, match=f"truncated: tensor {first.parts[1].tobytes().decode()} needs bytes"):
        read_gguf(tmp_path / "ffff.gguf")


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory) -> Path:
    """`pdg synth --like tiny` (a byte-level tokenizer of 512 tokens) as a Q8_0 GGUF."""
    from portable_dg.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    return convert_to_gguf(write_synthetic(root / "tiny", "tiny", dtype="f32"), root / "tiny.gguf", "Q8_0",
                           progress=False)


def field_offset(data: bytes, key: str) -> int:
    """Byte offset of a metadata key's length prefix."""
    name = key.encode()
    return data.index(struct.pack("<Q", len(name)) + name)


def test_array_lengths_are_bounded_before_reading(synthetic_gguf, tmp_path):
    """An array whose length is absurd (8 bytes lost before it, or overwritten) is refused at
    once, from its claimed size, instead of being walked item by item."""
    data = synthetic_gguf.read_bytes()
    at = field_offset(data, "tokenizer.ggml.tokens")
    count_at = at + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    for name, damaged in {
        "lost8": data[:at - 8] + data[at:],                                   # the previous value lost 8 bytes
        "count": data[:count_at] + struct.pack("<Q", 1 << 61) + data[count_at + 8:],
    }.items():
        (tmp_path / f"{name}.gguf").write_bytes(damaged)
        with pytest.raises(FormatError, match="corrupt or truncated GGUF file"):
            read_gguf(tmp_path / f"{name}.gguf")
        with pytest.raises(FormatError):
            describe_gguf(tmp_path / f"{name}.gguf")


def test_synthetic_marker_and_info(synthetic_gguf):
    from click.testing import CliRunner

    from portable_dg.cli import main

    assert read_gguf(synthetic_gguf).metadata["synthetic"] is True
    lines = CliRunner().invoke(main, ["info", str(synthetic_gguf)]).stdout.splitlines()
    assert "SYNTHETIC" in lines[0]
    assert [line.split()[0] for line in lines if line.split()[0] in ("tensors", "file")] == ["tensors", "file"]
    tensors = next(line for line in lines if line.startswith("  tensors"))
    assert tensors.split(None, 1)[1] == "Q8_0: 38, F32: 59"                   # the file's own types, once
    size = next(line for line in lines if line.startswith("  file")).split()[1:3]
    assert size[1].rstrip(",") in ("KB", "MB") and "BB" not in " ".join(lines)


# --- tokenizer in the metadata -----------------------------------------------------------------

def write_gemma_style_tokenizer(path: Path) -> None:
    """A small byte-fallback BPE tokenizer.json shaped like Gemma's, with its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + ["diffusion gemma"] * 20,
                                trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = spec["vocab"]                             # Gemma keeps its 256 byte tokens in the model's vocabulary
    vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in spec["merges"]], byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + ["<|turn>"]])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": "{{ bos_token }}{% for m in messages %}"
         "<|turn>{{ m['content'] }}{% endfor %}"}))


def test_tokenizer_and_template_travel_in_the_metadata(k256_dir, tmp_path):
    import shutil

    from portable_dg.converters.gguf import decode_fields, open_gguf
    from portable_dg.converters.gguf_tokenizer import HF_JSON, tokenizer_from_metadata
    from portable_dg.tokenizer import Tokenizer

    src = tmp_path / "src"
    shutil.copytree(k256_dir, src)
    write_gemma_style_tokenizer(src)
    path = convert_to_gguf(src, tmp_path / "tok.gguf", "Q8_0", progress=False)
    fields = decode_fields(open_gguf(path))
    assert fields["tokenizer.ggml.model"] == "gemma4" and fields["tokenizer.ggml.bos_token_id"] == 2
    # an added special token beyond the model's vocabulary that tokenizer_config.json does not name
    assert fields["tokenizer.ggml.token_type"][fields["tokenizer.ggml.tokens"].index("<|turn>")] == 4
    assert fields["tokenizer.ggml.token_type"][fields["tokenizer.ggml.tokens"].index("<bos>")] == 3
    original = Tokenizer.from_directory(src)
    text = "the lazy fox: diffusion gemma ünïcödé <|turn>"
    rebuilt = tokenizer_from_metadata({k: v for k, v in fields.items() if k != HF_JSON}, "test")
    for tok in (read_gguf(path).tokenizer, rebuilt):     # exact copy, and rebuilt from tokens + merges
        ids = tok.encode(text)
        assert ids == original.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == original.decode(ids)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<bos><|turn>hi"


def test_cli_convert_imatrix_quantize(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from portable_dg.cli import main

    run = CliRunner().invoke
    src, f16 = str(tiny_dir("a")), str(tmp_path / "a-f16.gguf")
    assert run(main, ["convert", src, f16, "--to", "gguf", "--quant", "f16"]).exit_code == 0
    im = str(tmp_path / "im.npz")
    assert run(main, ["imatrix", "--model", src, "--out", im, "--n-random", "1", "--steps", "1"]).exit_code == 0
    result = run(main, ["quantize", f16, str(tmp_path / "a-q8.gguf"), "--quant", "Q8_0", "--imatrix", im])
    assert result.exit_code == 0, result.output
    assert describe_gguf(tmp_path / "a-q8.gguf")["file_type"] == 7
    bad = run(main, ["quantize", f16, f16, "--quant", "Q8_0"])
    assert bad.exit_code == 1 and "refusing to overwrite" in bad.output


def test_sudoku_model_keeps_its_tokenizer_eos_and_budget(tmp_path):
    """A word-level tokenizer (not BPE) travels as tokenizer.huggingface.json; the EOS ids and
    max_new_tokens come from the generation config even without a BPE vocabulary."""
    from portable_dg import sudoku as sd

    source = portable_dg.load(sd.default_model_path())
    path = convert_to_gguf(sd.default_model_path(), tmp_path / "sudoku.gguf", "F32", progress=False)
    model = portable_dg.load(path)
    assert model.config.eos_token_id == source.config.eos_token_id == [sd.EOS]
    assert model.generation_config.max_new_tokens == source.generation_config.max_new_tokens == sd.CELLS
    puzzle, solution = sd.test_set(1)[0]
    assert model.tokenizer.encode(sd.grid_text(puzzle)) == source.tokenizer.encode(sd.grid_text(puzzle))
    assert model.tokenizer.decode(sd.solution_ids(solution).tolist()) == sd.grid_text(solution)


def test_cli_threads_option(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from portable_dg.cli import main

    runner = CliRunner()
    ok = runner.invoke(main, ["convert", str(tiny_dir("a")), str(tmp_path / "a.gguf"), "--to", "gguf", "--quant",
                              "Q8_0", "--threads", "2"])
    assert ok.exit_code == 0, ok.output
    zero = runner.invoke(main, ["quantize", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--quant", "Q4_0",
                                "--threads", "0"])
    assert zero.exit_code == 1 and "--threads must be at least 1" in zero.output
    mlx = runner.invoke(main, ["convert", str(tiny_dir("a")), str(tmp_path / "m"), "--to", "mlx", "--threads", "2"])
    assert mlx.exit_code == 1 and "--threads applies to --to gguf only" in mlx.output
