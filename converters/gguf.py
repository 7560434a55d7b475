"""GGUF files in the DiffusionGemma layout of llama.cpp PR #24423 (spec/file_formats.md §1).

`convert_to_gguf` writes one from a Hugging Face checkpoint (streaming tensor by tensor from the
memory-mapped safetensors), `requantize_gguf` rewrites one at another type, `read_gguf` reads ours,
Unsloth's and PR #24427's files into a `ModelSource`, and `describe_gguf` summarises one for
`pdg info`.  `GGUFTensor` is what the reader hands to backends for a quantized tensor: the raw,
memory-mapped blocks plus enough to dequantize them.  Names and keys: `gguf_names`; type choice and
ggml quantization: `gguf_quant`; tokenizer metadata: `gguf_tokenizer`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from portable_dg.config import DEFAULT_ROPE, FULL, SLIDING, DiffusionGemmaConfig, GenerationConfig
from portable_dg.errors import CheckpointError, ConfigError, FormatError
from portable_dg.outputs import check_new_file, output_file
from portable_dg.progress import Progress
from portable_dg.source import ModelSource

from .gguf_names import (ARCH, ARCH_ALIASES, DEC, ENC_SCALAR, ENC_SCALAR_GGUF, GLOBAL_TENSORS,
                         LAYER_TENSORS, ROPE_FREQS, SAMPLER_KEYS, SC_PRE_NORM_ALIASES, SPLIT_EXPERTS,
                         Keys, gguf_name, hf_layer_name)
from .gguf_quant import FILE_TYPES, READABLE_TYPES, check_quant, quantize_rows, row_bytes, tensor_type
from .gguf_reader import GGUFFile, Metadata, TensorInfo


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, kept in its stored (possibly quantized) form.

    `data` holds the stored bytes as uint8, shape (*shape[:-1], row_bytes): GGUF order, i.e. the
    HF shape with each row of `shape[-1]` values packed into `row_bytes` bytes of blocks.  It is a
    read-only view of the memory-mapped file unless the reader had to assemble it (split experts).
    """

    name: str                  # GGUF tensor name, e.g. "blk.0.ffn_gate_up_exps.weight"
    shape: tuple[int, ...]     # logical Hugging Face shape, e.g. (E, 2 * I, H)
    qtype: str                 # ggml type name, e.g. "Q4_K", "Q8_0", "BF16"
    ggml_type: int             # ggml_type enum value, e.g. 12 for Q4_K
    data: np.ndarray           # uint8 (*shape[:-1], row_bytes)

    def dequantize(self) -> np.ndarray:
        """The values as float32 in the HF shape (numpy dequantization of gguf-py)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.data, GGMLQuantizationType(self.ggml_type))
        return np.asarray(values, dtype=np.float32).reshape(self.shape)


# --- writing ----------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    """One tensor to write: its GGUF name, HF shape, ggml type and a reader of its float rows."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    rows: Callable[[int, int], np.ndarray]   # rows(a, b) -> float rows a..b-1 of [prod(shape[:-1]), shape[-1]]
    imatrix: np.ndarray | None = None         # [shape[-1]] or [E, shape[-1]]


def convert_to_gguf(src: str | Path, out: str | Path, quant: str = "F16", *,
                    imatrix: str | Path | None = None, force: bool = False, progress: bool = True,
                    threads: int | None = None) -> Path:
    """Convert a Hugging Face DiffusionGemma checkpoint directory to one GGUF file.

    Args:
        src: checkpoint directory (or hub repo id).
        out: the .gguf file to write (atomically; never the source; an existing file only with
            `force`).
        quant: one of `gguf_quant.QUANT_CHOICES` (F32, F16, BF16, Q8_0, Q4_0, Q3_K, Q4_K, Q5_K,
            Q6_K, Q4_K_M, Q5_K_M).
        imatrix: an importance matrix (.npz from `pdg imatrix`) for the quantized types.
        progress: report progress on stderr (bytes written).
        threads: rows quantized at once (default: every usable core).
    Returns: the output path."""
    from portable_dg.checkpoint import check_tensors, open_checkpoint, resolve_model_path, sanitize
    from portable_dg.source import read_configs
    from portable_dg.tokenizer import Tokenizer

    from .gguf_tokenizer import tokenizer_metadata

    check_quant(quant)
    src = resolve_model_path(src)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    check_new_file(out, force=force, sources=[src])
    raw, cfg, gen = read_configs(src)
    refs = sanitize(open_checkpoint(src))
    check_tensors(refs, cfg, str(src))
    importance = load_imatrix(imatrix) if imatrix else {}
    metadata = model_metadata(cfg, gen, name=src.name, quant=quant)
    if raw.get("portable_dg_synthetic"):
        metadata[Keys.SYNTHETIC] = ("BOOL", True)
    metadata.update(tokenizer_metadata(src, Tokenizer.from_directory(src)))
    planned = [_plan_hf_tensor(name, ref, quant, cfg, importance) for name, ref in _ordered(refs, cfg)]
    planned.insert(1, _rope_freqs_tensor(cfg))
    if importance and not any(t.imatrix is not None for t in planned):
        raise ConfigError(f"{imatrix}: the importance matrix has no entry for any quantized tensor of {src} "
                          "(made for another model?)")
    return write_gguf(out, ARCH, metadata, planned, sources=[src], force=force, progress=progress, threads=threads)


def _ordered(refs: Mapping[str, Any], cfg: DiffusionGemmaConfig) -> list[tuple[str, Any]]:
    """Canonical tensors in file order: globals, then each block's tensors in table order."""
    names = list(GLOBAL_TENSORS)
    for i in range(cfg.num_hidden_layers):
        names += [hf_layer_name(i, s) for s in LAYER_TENSORS] + [ENC_SCALAR.format(i=i)]
    return [(n, refs[n]) for n in names if n in refs]


def _plan_hf_tensor(name: str, ref: Any, quant: str, cfg: DiffusionGemmaConfig,
                    importance: Mapping[str, np.ndarray]) -> PlannedTensor:
    """A safetensors tensor (lazy TensorRef) planned for writing; rows are read on demand."""
    from portable_dg.checkpoint import bf16_to_f32

    gname = gguf_name(name)
    shape = tuple(ref.shape) or (1,)
    qtype = tensor_type(gname, shape, quant, cfg.num_hidden_layers, _v_index(cfg))
    stored = ref.raw().reshape(-1, shape[-1])                          # [rows, in], memory-mapped

    def rows(a: int, b: int) -> np.ndarray:
        chunk = stored[a:b]
        return bf16_to_f32(chunk) if ref.dtype == "BF16" else chunk
    return PlannedTensor(gname, shape, qtype, rows, _imatrix_for(gname, shape, qtype, importance))


def _v_index(cfg: DiffusionGemmaConfig) -> dict[int, int]:
    """Block index -> position among the blocks that carry attn_v (sliding layers)."""
    blocks = [i for i, g in enumerate(cfg.layers) if g.has_v_proj]
    return {i: k for k, i in enumerate(blocks)}


def _imatrix_for(name: str, shape: tuple[int, ...], qtype: str,
                 importance: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The imatrix entry of a tensor, checked against its shape; None for unquantized types."""
    if qtype in ("F32", "F16", "BF16") or name not in importance:
        return None
    m = importance[name]
    expected = (shape[0], shape[-1]) if len(shape) == 3 else (shape[-1],)
    if m.shape != expected:
        raise FormatError(f"imatrix entry {name} has shape {list(m.shape)}, expected {list(expected)}")
    return m


def _rope_freqs_tensor(cfg: DiffusionGemmaConfig) -> PlannedTensor:
    """rope_freqs.weight [full_head_dim / 2]: 1.0 on rotated pairs, 1e30 (no rotation) on the rest."""
    full = next((g for g in cfg.layers if g.kind == FULL), cfg.layers[0])
    half = full.head_dim // 2
    n_rot = int(full.rope_fraction * full.head_dim // 2)
    values = np.concatenate([np.ones(n_rot, np.float32), np.full(half - n_rot, 1e30, np.float32)])
    return PlannedTensor(ROPE_FREQS, (half,), "F32", lambda a, b: values.reshape(1, -1)[a:b])


def model_metadata(cfg: DiffusionGemmaConfig, gen: GenerationConfig, name: str,
                   quant: str) -> dict[str, tuple[str, Any]]:
    """The §1.3/§1.4 keys of a config: key -> (gguf-py value type name, value)."""
    sliding = [g for g in cfg.layers if g.kind == SLIDING]
    full = [g for g in cfg.layers if g.kind == FULL]
    swa = sliding[0] if sliding else cfg.layers[0]
    glob = full[0] if full else cfg.layers[0]
    k = {key: val for key, val in {
        "general.type": ("STRING", "model"),
        "general.name": ("STRING", name),
        "general.file_type": ("UINT32", FILE_TYPES[quant]),
        "general.quantization_version": ("UINT32", 2),
        Keys.CONTEXT_LENGTH: ("UINT32", cfg.max_position_embeddings),
        Keys.EMBEDDING_LENGTH: ("UINT32", cfg.hidden_size),
        Keys.BLOCK_COUNT: ("UINT32", cfg.num_hidden_layers),
        Keys.FEED_FORWARD_LENGTH: ("UINT32", cfg.intermediate_size),
        Keys.EXPERT_FEED_FORWARD_LENGTH: ("UINT32", cfg.moe_intermediate_size),
        Keys.EXPERT_COUNT: ("UINT32", cfg.num_experts),
        Keys.EXPERT_USED_COUNT: ("UINT32", cfg.top_k_experts),
        Keys.HEAD_COUNT: ("UINT32", cfg.num_attention_heads),
        Keys.HEAD_COUNT_KV: ("ARRAY:INT32", [g.num_kv_heads for g in cfg.layers]),
        Keys.KEY_LENGTH: ("UINT32", glob.head_dim),
        Keys.VALUE_LENGTH: ("UINT32", glob.head_dim),
        Keys.KEY_LENGTH_SWA: ("UINT32", swa.head_dim),
        Keys.VALUE_LENGTH_SWA: ("UINT32", swa.head_dim),
        Keys.SLIDING_WINDOW: ("UINT32", cfg.sliding_window),
        Keys.SLIDING_WINDOW_PATTERN: ("ARRAY:BOOL", [g.kind == SLIDING for g in cfg.layers]),
        Keys.RMS_EPS: ("FLOAT32", cfg.rms_norm_eps),
        Keys.CAUSAL: ("BOOL", False),
        Keys.SHARED_KV_LAYERS: ("UINT32", 0),
        Keys.PER_LAYER_INPUT: ("UINT32", 0),
        Keys.ROPE_FREQ_BASE: ("FLOAT32", glob.rope_theta),
        Keys.ROPE_FREQ_BASE_SWA: ("FLOAT32", swa.rope_theta),
        Keys.ROPE_DIMENSION_COUNT: ("UINT32", glob.head_dim),
        Keys.ROPE_DIMENSION_COUNT_SWA: ("UINT32", int(swa.head_dim * swa.rope_fraction)),
        Keys.FINAL_LOGIT_SOFTCAPPING: ("FLOAT32", cfg.final_logit_softcapping),
        Keys.VOCAB_SIZE: ("UINT32", cfg.vocab_size),
        Keys.CANVAS_LENGTH: ("UINT32", cfg.canvas_length),
        Keys.EB_MAX_STEPS: ("UINT32", gen.max_denoising_steps),
        Keys.EB_T_MIN: ("FLOAT32", gen.t_min),
        Keys.EB_T_MAX: ("FLOAT32", gen.t_max),
        Keys.EB_ENTROPY_BOUND: ("FLOAT32", gen.entropy_bound),
        Keys.EB_STABILITY_THRESHOLD: ("UINT32", gen.stability_threshold),
        Keys.EB_CONFIDENCE_THRESHOLD: ("FLOAT32", gen.confidence_threshold),
        Keys.MAX_NEW_TOKENS: ("UINT32", gen.max_new_tokens),
    }.items()}
    if gen.eos_token_id:
        k[Keys.EOS_IDS] = ("ARRAY:INT32", list(gen.eos_token_id))
    return {key.format(arch=ARCH): val for key, val in k.items()}


def write_gguf(out: str | Path, arch: str, metadata: Mapping[str, tuple[str, Any]],
               planned: list[PlannedTensor], *, sources: Sequence[Path] = (), force: bool = False,
               progress: bool = True, threads: int | None = None) -> Path:
    """Write metadata and tensors with gguf-py's GGUFWriter, one tensor at a time (its rows
    quantized on `threads` threads, default every usable core), to a temporary file next to
    `out`, then rename it (see `portable_dg.outputs.output_file`)."""
    from gguf import GGUFValueType, GGUFWriter, GGMLQuantizationType

    out = Path(out)
    sizes = [int(np.prod(t.shape[:-1], dtype=np.int64)) * row_bytes(t.qtype, t.shape[-1]) for t in planned]
    with output_file(out, force=force, sources=sources) as tmp, \
            Progress(sum(sizes), f"writing {out.name}", enabled=progress) as bar:
        writer = GGUFWriter(tmp, arch)
        try:
            for key, (vtype, value) in metadata.items():
                kind, _, sub = vtype.partition(":")
                writer.add_key_value(key, value, GGUFValueType[kind], GGUFValueType[sub] if sub else None)
            for t, nbytes in zip(planned, sizes):
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=GGMLQuantizationType[t.qtype])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in planned:
                writer.write_tensor_data(quantize_rows(t.rows, t.shape, t.qtype, t.imatrix, on_rows=bar.update,
                                                       threads=threads))
        finally:
            with contextlib.suppress(OSError):    # a full disk fails the flush again; the write's error counts
                writer.close()
    return out


def requantize_gguf(src: str | Path, out: str | Path, quant: str, *, imatrix: str | Path | None = None,
                    force: bool = False, progress: bool = True, threads: int | None = None) -> Path:
    """Re-quantize a GGUF file whose matrices are F32, F16, BF16 or Q8_0 (`pdg quantize`).

    Metadata is copied (file type updated); every tensor gets the type `quant` assigns to it.
    `out` must not exist unless `force`; it is never `src`."""
    check_quant(quant)
    src = Path(src)
    check_new_file(out, force=force, sources=[src])
    file = open_gguf(src)
    fields = decode_fields(file)
    arch = _architecture(fields, src)
    n_layers = _int_field(fields, Keys.BLOCK_COUNT.format(arch=arch), src)
    pattern = _bool_list(fields, Keys.SLIDING_WINDOW_PATTERN.format(arch=arch), n_layers, src, [True] * n_layers)
    v_index = {i: k for k, i in enumerate(i for i, s in enumerate(pattern) if s)}
    importance = load_imatrix(imatrix) if imatrix else {}
    planned = []
    for t in file.tensors:
        stored = _stored_tensor(file, t)
        qtype = tensor_type(t.name, stored.shape, quant, n_layers, v_index)
        if stored.qtype not in REQUANTIZABLE and stored.qtype != qtype:
            raise ConfigError(f"{src}: tensor {t.name} is {stored.qtype}; requantizing needs "
                              f"{', '.join(REQUANTIZABLE)} sources")
        planned.append(PlannedTensor(t.name, stored.shape, qtype, _dequantized_rows(stored),
                                     _imatrix_for(t.name, stored.shape, qtype, importance)))
    metadata = {key: (field.type_name, fields[key]) for key, field in file.fields.items()
                if key not in ("general.architecture", "general.file_type", "general.alignment")}
    metadata["general.file_type"] = ("UINT32", FILE_TYPES[quant])
    return write_gguf(out, arch, metadata, planned, sources=[src], force=force, progress=progress, threads=threads)


REQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0")


def _dequantized_rows(t: GGUFTensor) -> Callable[[int, int], np.ndarray]:
    flat = t.data.reshape(-1, t.data.shape[-1])                          # [rows, row_bytes]

    def rows(a: int, b: int) -> np.ndarray:
        return GGUFTensor(t.name, (b - a, t.shape[-1]), t.qtype, t.ggml_type, flat[a:b]).dequantize()
    return rows


# --- reading ----------------------------------------------------------------------------------

def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor infos (bounded and lazy, see gguf_reader)."""
    return GGUFFile(path)


def decode_fields(file: GGUFFile) -> Metadata:
    """The metadata as a mapping key -> Python value (strings decoded, arrays as lists), each
    key decoded on first access."""
    return Metadata(file)


def _architecture(fields: Mapping[str, Any], path: Path) -> str:
    arch = fields.get("general.architecture")
    if arch == "clip":
        raise FormatError(f"{path}: a vision projector (mmproj) file, not a model: give it beside its model "
                          "(--mmproj, or load(..., mmproj=))")
    if arch not in ARCH_ALIASES:
        raise FormatError(f"{path}: general.architecture is {arch!r}, expected one of "
                          f"{', '.join(repr(a) for a in ARCH_ALIASES)} (DiffusionGemma)")
    return arch


def _int_field(fields: Mapping[str, Any], key: str, path: Path, default: int | None = None) -> int:
    """A positive integer metadata value (sizes and counts)."""
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FormatError(f"{path}: metadata key {key} is {value!r}, expected a positive integer")
    return value


def _float_field(fields: Mapping[str, Any], key: str, path: Path, default: float) -> float:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{path}: metadata key {key} is {value!r}, expected a number")
    return float(value)


def _bool_list(fields: Mapping[str, Any], key: str, n: int, path: Path, default: list[bool] | None = None
               ) -> list[bool]:
    value = fields.get(key, default)
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, bool) for v in value)):
        raise FormatError(f"{path}: {key} must list {n} booleans")
    return value


def _int_list(fields: Mapping[str, Any], key: str, n: int, path: Path) -> list[int]:
    """A per-layer list of positive integers (a single integer applies to every layer)."""
    value = fields.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    if not (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise FormatError(f"{path}: {key} must list {n} positive integers")
    return value


def _stored_tensor(file: GGUFFile, t: TensorInfo) -> GGUFTensor:
    """A tensor of the file as a GGUFTensor in HF shape (its `ne` reversed), data memory-mapped."""
    if t.qtype not in READABLE_TYPES:
        raise FormatError(f"{file.path}: tensor {t.name} has type {t.qtype}, which this reader does not "
                          f"support (supported: {', '.join(READABLE_TYPES)})")
    data = file.data(t).reshape(*t.shape[:-1], -1)                     # [..., row_bytes]
    return GGUFTensor(t.name, t.shape, t.qtype, t.ggml_type, data)


def read_gguf(path: str | Path) -> ModelSource:
    """A DiffusionGemma GGUF file (PR #24423 layout; PR #24427's variant accepted) as a ModelSource.

    Tensors come under canonical HF names: F32/F16 as memory-mapped numpy arrays, other types as
    `GGUFTensor`s.  Raises FormatError on a malformed file or one of another architecture."""
    from .gguf_tokenizer import tokenizer_from_metadata

    path = Path(path)
    file = open_gguf(path)
    fields = decode_fields(file)
    arch = _architecture(fields, path)
    stored = {t.name: t for t in file.tensors}
    rope = stored.get(ROPE_FREQS)
    cfg = config_from_metadata(fields, arch, stored, None if rope is None else _stored_tensor(file, rope), path)
    gen = generation_from_metadata(fields, cfg, path)
    tensors = canonical_tensors(file, cfg)
    tokenizer = tokenizer_from_metadata(fields, str(path))
    metadata = {"architecture": arch, "types": sorted({t.qtype for t in file.tensors}),
                "file_type": fields.get("general.file_type"), "eos_from_metadata": Keys.EOS_IDS in fields,
                "synthetic": fields.get(Keys.SYNTHETIC) is True}
    return ModelSource(cfg, gen, tensors, tokenizer, "gguf", path, metadata)


def config_from_metadata(fields: Mapping[str, Any], arch: str, stored: Mapping[str, TensorInfo],
                         rope_freqs: GGUFTensor | None, path: Path) -> DiffusionGemmaConfig:
    """DiffusionGemmaConfig from the §1.3 keys (per-layer geometry spelled out per layer)."""
    def key(k: str) -> str:
        return k.format(arch=arch)
    n_layers = _int_field(fields, key(Keys.BLOCK_COUNT), path)
    pattern = _bool_list(fields, key(Keys.SLIDING_WINDOW_PATTERN), n_layers, path)
    heads_kv = _int_list(fields, key(Keys.HEAD_COUNT_KV), n_layers, path)
    d_full = _int_field(fields, key(Keys.KEY_LENGTH), path)
    d_swa = _int_field(fields, key(Keys.KEY_LENGTH_SWA), path, d_full)
    embed = stored.get("token_embd.weight")
    vocab = _int_field(fields, key(Keys.VOCAB_SIZE), path, embed.ne[-1] if embed is not None else None)
    try:
        return DiffusionGemmaConfig(
            vocab_size=vocab,
            hidden_size=_int_field(fields, key(Keys.EMBEDDING_LENGTH), path),
            intermediate_size=_int_field(fields, key(Keys.FEED_FORWARD_LENGTH), path),
            moe_intermediate_size=_int_field(fields, key(Keys.EXPERT_FEED_FORWARD_LENGTH), path),
            num_experts=_int_field(fields, key(Keys.EXPERT_COUNT), path),
            top_k_experts=_int_field(fields, key(Keys.EXPERT_USED_COUNT), path),
            num_hidden_layers=n_layers,
            num_attention_heads=_int_field(fields, key(Keys.HEAD_COUNT), path),
            num_key_value_heads=heads_kv[0],
            head_dim=d_swa,
            global_head_dim=d_full,
            per_layer_config={i: {"head_dim": d_swa if s else d_full, "num_key_value_heads": h}
                              for i, (s, h) in enumerate(zip(pattern, heads_kv))},
            layer_types=[SLIDING if s else FULL for s in pattern],
            sliding_window=_int_field(fields, key(Keys.SLIDING_WINDOW), path),
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": _float_field(
                    fields, key(Keys.ROPE_FREQ_BASE_SWA), path, 10_000.0)},
                FULL: {"rope_type": "proportional", "rope_theta": _float_field(
                    fields, key(Keys.ROPE_FREQ_BASE), path, 1_000_000.0),
                    "partial_rotary_factor": _rope_fraction(rope_freqs, d_full, path)},
            },
            rms_norm_eps=_float_field(fields, key(Keys.RMS_EPS), path, 1e-6),
            max_position_embeddings=_int_field(fields, key(Keys.CONTEXT_LENGTH), path, 262_144),
            final_logit_softcapping=_float_field(fields, key(Keys.FINAL_LOGIT_SOFTCAPPING), path, 30.0),
            canvas_length=_int_field(fields, Keys.CANVAS_LENGTH, path, 256),
            bos_token_id=_token_id(fields, "tokenizer.ggml.bos_token_id", vocab, path, 2),
            pad_token_id=_token_id(fields, "tokenizer.ggml.padding_token_id", vocab, path, 0),
            eos_token_id=_eos_ids(fields, vocab, path),
        )
    except ConfigError as e:
        raise FormatError(f"{path}: inconsistent metadata: {e}") from None


def _token_id(fields: Mapping[str, Any], key: str, vocab: int, path: Path, default: int) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise FormatError(f"{path}: metadata key {key} is {value!r}, expected a token id below {vocab}")
    return value


def _eos_ids(fields: Mapping[str, Any], vocab: int, path: Path) -> list[int]:
    """tokenizer.ggml.eos_token_ids when written; otherwise DiffusionGemma's {1, 106, 50} (spec
    §1.5: the Unsloth files carry only one eos id and unreliable token types)."""
    ids = fields.get(Keys.EOS_IDS)
    if ids is None or ids == []:
        return [i for i in (1, 106, 50) if i < vocab]
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                          for i in ids)):
        raise FormatError(f"{path}: metadata key {Keys.EOS_IDS} must list token ids below {vocab}")
    return ids


def _rope_fraction(freqs: GGUFTensor | None, d_full: int, path: Path) -> float:
    """The rotated fraction of full-layer heads from rope_freqs (1.0 = rotate, >= 1e29 = not)."""
    if freqs is None:
        return DEFAULT_ROPE[FULL]["partial_rotary_factor"]
    if freqs.qtype != "F32" or freqs.shape != (d_full // 2,):
        raise FormatError(f"{path}: tensor {ROPE_FREQS} must be F32 [{d_full // 2}]")
    values = freqs.data.view(np.float32).reshape(-1)
    rotated = values == 1.0
    n_rot = int(rotated.sum())
    if not (rotated[:n_rot].all() and (values[n_rot:] >= 1e29).all()):
        raise FormatError(f"{path}: tensor {ROPE_FREQS} must be 1.0 on a prefix and 1e30 after it "
                          "(proportional RoPE); other frequency factors are not supported")
    return 2 * n_rot / d_full


def generation_from_metadata(fields: Mapping[str, Any], cfg: DiffusionGemmaConfig,
                             path: Path) -> GenerationConfig:
    """Sampler defaults from the diffusion.eb_* keys (missing keys: llama-diffusion-cli defaults)."""
    kwargs = {field: fields[key] for key, field in SAMPLER_KEYS.items() if key in fields}
    try:
        return GenerationConfig(eos_token_id=list(cfg.eos_token_id), pad_token_id=cfg.pad_token_id,
                                **kwargs)
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{path}: invalid diffusion.* sampler metadata: {e}") from None


def canonical_tensors(file: GGUFFile, cfg: DiffusionGemmaConfig) -> dict[str, Any]:
    """Canonical HF name -> array or GGUFTensor, each checked against the config's shapes."""
    from portable_dg.checkpoint import expected_tensors

    stored = {t.name: t for t in file.tensors}
    out = {}
    for name, shape in expected_tensors(cfg).items():
        tensor = _find_tensor(name, file, stored)
        if tuple(tensor.shape) != shape:
            raise FormatError(f"{file.path}: tensor {tensor.name} has HF shape {list(tensor.shape)}, "
                              f"expected {list(shape)} (for {name})")
        out[name] = tensor.data.view(np.float32 if tensor.qtype == "F32" else np.float16).reshape(shape) \
            if tensor.qtype in ("F32", "F16") else tensor
    return out


def _find_tensor(name: str, file: GGUFFile, stored: Mapping[str, TensorInfo]) -> GGUFTensor:
    """The stored tensor of a canonical name, with PR #24427's names and split experts accepted."""
    gname = gguf_name(name)
    candidates = [gname]
    if gname == GLOBAL_TENSORS[DEC + "self_conditioning.pre_norm.weight"]:
        candidates = list(SC_PRE_NORM_ALIASES)
    elif gname.endswith(ENC_SCALAR_GGUF):   # PR #24427 exports no encoder scalar: use the decoder's
        candidates.append(gname.replace(ENC_SCALAR_GGUF, LAYER_TENSORS["layer_scalar"]))
    for candidate in candidates:
        if candidate in stored:
            return _stored_tensor(file, stored[candidate])
    if gname.endswith("ffn_gate_up_exps.weight"):
        block = gname.rsplit(".", 2)[0]
        parts = [stored.get(f"{block}.{p}") for p in SPLIT_EXPERTS]
        if all(p is not None for p in parts):
            return _fuse_experts([_stored_tensor(file, p) for p in parts], gname, file.path)
    raise FormatError(f"{file.path}: missing tensor {gname} (for {name})")


def _fuse_experts(parts: list[GGUFTensor], name: str, path: Path) -> GGUFTensor:
    """ffn_gate_exps + ffn_up_exps [E, I, H] each -> the fused [E, 2I, H] (gate rows first)."""
    gate, up = parts
    if gate.shape != up.shape or len(gate.shape) != 3:
        raise FormatError(f"{path}: {gate.name} {list(gate.shape)} and {up.name} {list(up.shape)} "
                          "must have the same shape [E, I, H]")
    if gate.qtype == up.qtype:
        data = np.concatenate([gate.data, up.data], axis=1)             # [E, 2I, row_bytes]
        return GGUFTensor(name, (gate.shape[0], 2 * gate.shape[1], gate.shape[2]), gate.qtype,
                          gate.ggml_type, data)
    values = np.concatenate([gate.dequantize(), up.dequantize()], axis=1)  # [E, 2I, H] float32
    return GGUFTensor(name, values.shape, "F32", 0, values.view(np.uint8))


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """An importance matrix written by `pdg imatrix` (.npz: GGUF tensor name -> mean x^2 per input
    column, [in] or [E, in] for expert tensors)."""
    import zipfile

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive")
            out = {k: np.asarray(z[k], np.float32) for k in z.files}
    except FileNotFoundError:
        raise ConfigError(f"{path}: imatrix file not found") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise FormatError(f"{path}: not an imatrix .npz file ({e})") from None
    if not any(not k.endswith(".count") for k in out):
        raise FormatError(f"{path}: the importance matrix is empty (no tensor entries)")
    bad = [k for k, v in out.items() if not np.isfinite(v).all() or (v < 0).any()]
    if bad:
        raise FormatError(f"{path}: imatrix entry {bad[0]} has negative or non-finite values")
    return out


# --- inspection -------------------------------------------------------------------------------

def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What `pdg info` prints for a GGUF file, read from its header alone (no tensor data, no
    tokenizer arrays decoded).

    Returns: {"path", "file_size" (bytes), "architecture", "file_type" (llama_ftype int or None),
    "n_tensors", "n_parameters", "tensor_bytes", "bits_per_weight" (over all tensors),
    "types": {qtype: {"tensors", "parameters", "bytes"}} (largest first),
    "metadata": {key: value} with arrays longer than 16 items summarised as "[TYPE x N]"}."""
    path = Path(path)
    file = open_gguf(path)
    types: dict[str, dict[str, int]] = {}
    for t in file.tensors:
        entry = types.setdefault(t.qtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += t.n_elements
        entry["bytes"] += t.nbytes
    n_params = sum(e["parameters"] for e in types.values())
    n_bytes = sum(e["bytes"] for e in types.values())
    metadata = {key: f"[{field.type_name.split(':')[1]} x {field.count}]"
                if field.type_name.startswith("ARRAY") and field.count > 16 else file.value(key)
                for key, field in file.fields.items()}
    return {
        "path": str(path), "file_size": file.size,
        "architecture": metadata.get("general.architecture"),
        "file_type": metadata.get("general.file_type"),
        "n_tensors": len(file.tensors), "n_parameters": n_params, "tensor_bytes": n_bytes,
        "bits_per_weight": 8 * n_bytes / n_params if n_params else 0.0,
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "metadata": metadata,
    }
