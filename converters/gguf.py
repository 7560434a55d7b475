"""GGUF files in the DiffusionGemma layout of llama.cpp PR #24423 (spec/file_formats.md §1).

`convert_to_gguf` writes one from a Hugging Face checkpoint (streaming tensor by tensor from the
memory-mapped safetensors), `requantize_gguf` rewrites one at another type, `read_gguf` reads ours,
Unsloth's and PR #24427's files into a `ModelSource`, and `describe_gguf` summarises one for
`pdg info`.  `GGUFTensor` is what the reader hands to backends for a quantized tensor: the raw,
memory-mapped blocks plus enough to dequantize them.  Names and keys: `gguf_names`; type choice and
ggml quantization: `gguf_quant`; tokenizer metadata: `gguf_tokenizer`.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from portable_dg.config import DEFAULT_ROPE, FULL, SLIDING, DiffusionGemmaConfig, GenerationConfig
from portable_dg.errors import CheckpointError, ConfigError, FormatError
from portable_dg.source import ModelSource

from .gguf_names import (ARCH, ARCH_ALIASES, DEC, ENC_SCALAR, ENC_SCALAR_GGUF, GLOBAL_TENSORS,
                         LAYER_TENSORS, ROPE_FREQS, SAMPLER_KEYS, SC_PRE_NORM_ALIASES, SPLIT_EXPERTS,
                         Keys, gguf_name, hf_layer_name)
from .gguf_quant import FILE_TYPES, READABLE_TYPES, check_quant, quantize_rows, row_bytes, tensor_type


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
                    imatrix: str | Path | None = None, progress: bool = True) -> Path:
    """Convert a Hugging Face DiffusionGemma checkpoint directory to one GGUF file.

    Args:
        src: checkpoint directory (or hub repo id).
        out: the .gguf file to write (atomically; never the source).
        quant: one of `gguf_quant.QUANT_CHOICES` (F32, F16, BF16, Q8_0, Q4_0, Q3_K, Q4_K, Q5_K,
            Q6_K, Q4_K_M, Q5_K_M).
        imatrix: an importance matrix (.npz from `pdg imatrix`) for the quantized types.
        progress: show a tqdm bar.
    Returns: the output path."""
    from portable_dg.checkpoint import check_tensors, open_checkpoint, resolve_model_path, sanitize
    from portable_dg.config import DiffusionGemmaConfig, GenerationConfig, read_json
    from portable_dg.tokenizer import Tokenizer

    from .gguf_tokenizer import tokenizer_metadata

    check_quant(quant)
    src = resolve_model_path(src)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    cfg = DiffusionGemmaConfig.from_file(src / "config.json")
    gen_path = src / "generation_config.json"
    gen = GenerationConfig.from_dict(read_json(gen_path) if gen_path.exists() else {}, cfg, str(gen_path))
    refs = sanitize(open_checkpoint(src))
    check_tensors(refs, cfg, str(src))
    importance = load_imatrix(imatrix) if imatrix else {}
    metadata = model_metadata(cfg, gen, name=src.name, quant=quant)
    metadata.update(tokenizer_metadata(src, Tokenizer.from_directory(src)))
    planned = [_plan_hf_tensor(name, ref, quant, cfg, importance) for name, ref in _ordered(refs, cfg)]
    planned.insert(1, _rope_freqs_tensor(cfg))
    return write_gguf(out, ARCH, metadata, planned, protect=src, progress=progress)


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
               planned: list[PlannedTensor], *, protect: Path | None = None,
               progress: bool = True) -> Path:
    """Write metadata and tensors with gguf-py's GGUFWriter, one tensor at a time, to a temporary
    file next to `out`, then rename it; refuses to overwrite `protect` (the source)."""
    from gguf import GGUFValueType, GGUFWriter, GGMLQuantizationType
    from tqdm import tqdm

    out = Path(out)
    if protect is not None and out.exists() and (out.resolve() == protect.resolve()
                                                 or protect.resolve() in out.resolve().parents):
        raise ConfigError(f"{out}: refusing to overwrite the source")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)
        for key, (vtype, value) in metadata.items():
            kind, _, sub = vtype.partition(":")
            writer.add_key_value(key, value, GGUFValueType[kind], GGUFValueType[sub] if sub else None)
        for t in planned:
            nbytes = int(np.prod(t.shape[:-1], dtype=np.int64)) * row_bytes(t.qtype, t.shape[-1])
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes,
                                   raw_dtype=GGMLQuantizationType[t.qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(planned, desc=f"writing {out.name}", unit="tensor", disable=not progress):
            writer.write_tensor_data(quantize_rows(t.rows, t.shape, t.qtype, t.imatrix))
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def requantize_gguf(src: str | Path, out: str | Path, quant: str, *,
                    imatrix: str | Path | None = None, progress: bool = True) -> Path:
    """Re-quantize a GGUF file whose matrices are F32, F16, BF16 or Q8_0 (`pdg quantize`).

    Metadata is copied (file type updated); every tensor gets the type `quant` assigns to it."""
    check_quant(quant)
    src = Path(src)
    reader = open_gguf(src)
    fields = decode_fields(reader)
    arch = _architecture(fields, src)
    n_layers = _int_field(fields, Keys.BLOCK_COUNT.format(arch=arch), src)
    pattern = fields.get(Keys.SLIDING_WINDOW_PATTERN.format(arch=arch)) or [True] * n_layers
    v_index = {i: k for k, i in enumerate(i for i, s in enumerate(pattern) if s)}
    importance = load_imatrix(imatrix) if imatrix else {}
    planned = []
    for t in reader.tensors:
        stored = _stored_tensor(t, src)
        qtype = tensor_type(t.name, stored.shape, quant, n_layers, v_index)
        if stored.qtype not in REQUANTIZABLE and stored.qtype != qtype:
            raise ConfigError(f"{src}: tensor {t.name} is {stored.qtype}; requantizing needs "
                              f"{', '.join(REQUANTIZABLE)} sources")
        planned.append(PlannedTensor(t.name, stored.shape, qtype, _dequantized_rows(stored),
                                     _imatrix_for(t.name, stored.shape, qtype, importance)))
    metadata = {key: (_value_type_name(reader.fields[key]), value) for key, value in fields.items()
                if key not in ("general.architecture", "general.file_type")
                and not key.startswith("GGUF.")}
    metadata["general.file_type"] = ("UINT32", FILE_TYPES[quant])
    return write_gguf(out, arch, metadata, planned, protect=src, progress=progress)


REQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0")


def _dequantized_rows(t: GGUFTensor) -> Callable[[int, int], np.ndarray]:
    flat = t.data.reshape(-1, t.data.shape[-1])                          # [rows, row_bytes]

    def rows(a: int, b: int) -> np.ndarray:
        return GGUFTensor(t.name, (b - a, t.shape[-1]), t.qtype, t.ggml_type, flat[a:b]).dequantize()
    return rows


def _value_type_name(field: Any) -> str:
    """gguf-py ReaderField -> our "TYPE" / "ARRAY:SUBTYPE" name."""
    kind = field.types[0].name
    return f"{kind}:{field.types[1].name}" if kind == "ARRAY" else kind


# --- reading ----------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
MIN_KV_BYTES = 8 + 4 + 1          # key length, value type, at least one byte of value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


def open_gguf(path: str | Path) -> Any:
    """gguf-py's GGUFReader on a file, after checking the header ourselves (magic, version, and
    counts the file is large enough to hold); any parse failure becomes a FormatError."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    if len(head) < 24:
        raise FormatError(f"{path}: truncated GGUF file ({size} bytes, no header)")
    magic, (version, n_tensors, n_kv) = head[:4], struct.unpack("<IQQ", head[4:])
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if version not in GGUF_VERSIONS:
        raise FormatError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > size:
        raise FormatError(f"{path}: header claims {n_kv} metadata keys and {n_tensors} tensors, "
                          f"more than a {size}-byte file can hold (truncated or corrupt)")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error,
            UnicodeDecodeError, MemoryError) as e:
        raise FormatError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise FormatError(f"{path}: truncated: tensor {t.name} needs bytes {t.data_offset}.."
                              f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def decode_fields(reader: Any) -> dict[str, Any]:
    """Metadata as Python values (strings decoded, arrays as lists)."""
    from gguf import GGUFValueType

    out = {}
    for key, field in reader.fields.items():
        try:
            value = field.contents()
            if field.types == [GGUFValueType.FLOAT32]:   # the decimal it was written from: 0.4, not 0.4000000059604645
                value = float(str(np.float32(value)))
            out[key] = value
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise FormatError(f"{reader.data.filename}: metadata key {key} is corrupt ({e})") from None
    return out


def _architecture(fields: Mapping[str, Any], path: Path) -> str:
    arch = fields.get("general.architecture")
    if arch not in ARCH_ALIASES:
        raise FormatError(f"{path}: general.architecture is {arch!r}, expected one of "
                          f"{', '.join(repr(a) for a in ARCH_ALIASES)} (DiffusionGemma)")
    return arch


def _int_field(fields: Mapping[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{path}: metadata key {key} is {value!r}, expected an integer")
    return value


def _float_field(fields: Mapping[str, Any], key: str, path: Path, default: float) -> float:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{path}: metadata key {key} is {value!r}, expected a number")
    return float(value)


def _stored_tensor(t: Any, path: Path) -> GGUFTensor:
    """A gguf-py ReaderTensor as a GGUFTensor in HF shape (its `ne` reversed)."""
    qtype = t.tensor_type.name
    if qtype not in READABLE_TYPES:
        raise FormatError(f"{path}: tensor {t.name} has type {qtype}, which this reader does not "
                          f"support (supported: {', '.join(READABLE_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    data = t.data.view(np.uint8).reshape(*shape[:-1], -1)             # [..., row_bytes]
    return GGUFTensor(t.name, shape, qtype, int(t.tensor_type), data)


def read_gguf(path: str | Path) -> ModelSource:
    """A DiffusionGemma GGUF file (PR #24423 layout; PR #24427's variant accepted) as a ModelSource.

    Tensors come under canonical HF names: F32/F16 as memory-mapped numpy arrays, other types as
    `GGUFTensor`s.  Raises FormatError on a malformed file or one of another architecture."""
    from .gguf_tokenizer import tokenizer_from_metadata

    path = Path(path)
    reader = open_gguf(path)
    fields = decode_fields(reader)
    arch = _architecture(fields, path)
    stored = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(fields, arch, stored, path)
    gen = generation_from_metadata(fields, cfg, path)
    tensors = canonical_tensors(stored, cfg, path)
    tokenizer = tokenizer_from_metadata(fields, str(path))
    types = sorted({t.tensor_type.name for t in reader.tensors})
    metadata = {"architecture": arch, "types": types, "file_type": fields.get("general.file_type"),
                "eos_from_metadata": Keys.EOS_IDS in fields}
    return ModelSource(cfg, gen, tensors, tokenizer, "gguf", path, metadata)


def config_from_metadata(fields: Mapping[str, Any], arch: str, stored: Mapping[str, Any],
                         path: Path) -> DiffusionGemmaConfig:
    """DiffusionGemmaConfig from the §1.3 keys (per-layer geometry spelled out per layer)."""
    def key(k: str) -> str:
        return k.format(arch=arch)
    n_layers = _int_field(fields, key(Keys.BLOCK_COUNT), path)
    pattern = fields.get(key(Keys.SLIDING_WINDOW_PATTERN))
    heads_kv = fields.get(key(Keys.HEAD_COUNT_KV))
    if not isinstance(pattern, list) or len(pattern) != n_layers:
        raise FormatError(f"{path}: {key(Keys.SLIDING_WINDOW_PATTERN)} must list {n_layers} booleans")
    if isinstance(heads_kv, int):
        heads_kv = [heads_kv] * n_layers
    if not isinstance(heads_kv, list) or len(heads_kv) != n_layers:
        raise FormatError(f"{path}: {key(Keys.HEAD_COUNT_KV)} must list {n_layers} integers")
    d_full = _int_field(fields, key(Keys.KEY_LENGTH), path)
    d_swa = _int_field(fields, key(Keys.KEY_LENGTH_SWA), path, d_full)
    embed = stored.get("token_embd.weight")
    vocab = fields.get(key(Keys.VOCAB_SIZE)) or (int(embed.shape[1]) if embed is not None else 0)
    layer_types = [SLIDING if s else FULL for s in pattern]
    try:
        return DiffusionGemmaConfig(
            vocab_size=int(vocab),
            hidden_size=_int_field(fields, key(Keys.EMBEDDING_LENGTH), path),
            intermediate_size=_int_field(fields, key(Keys.FEED_FORWARD_LENGTH), path),
            moe_intermediate_size=_int_field(fields, key(Keys.EXPERT_FEED_FORWARD_LENGTH), path),
            num_experts=_int_field(fields, key(Keys.EXPERT_COUNT), path),
            top_k_experts=_int_field(fields, key(Keys.EXPERT_USED_COUNT), path),
            num_hidden_layers=n_layers,
            num_attention_heads=_int_field(fields, key(Keys.HEAD_COUNT), path),
            num_key_value_heads=int(heads_kv[0]),
            head_dim=d_swa,
            global_head_dim=d_full,
            per_layer_config={i: {"head_dim": d_swa if s else d_full, "num_key_value_heads": int(h)}
                              for i, (s, h) in enumerate(zip(pattern, heads_kv))},
            layer_types=layer_types,
            sliding_window=_int_field(fields, key(Keys.SLIDING_WINDOW), path),
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": _float_field(
                    fields, key(Keys.ROPE_FREQ_BASE_SWA), path, 10_000.0)},
                FULL: {"rope_type": "proportional", "rope_theta": _float_field(
                    fields, key(Keys.ROPE_FREQ_BASE), path, 1_000_000.0),
                    "partial_rotary_factor": _rope_fraction(stored.get(ROPE_FREQS), d_full, path)},
            },
            rms_norm_eps=_float_field(fields, key(Keys.RMS_EPS), path, 1e-6),
            max_position_embeddings=_int_field(fields, key(Keys.CONTEXT_LENGTH), path, 262_144),
            final_logit_softcapping=_float_field(fields, key(Keys.FINAL_LOGIT_SOFTCAPPING), path, 30.0),
            canvas_length=_int_field(fields, Keys.CANVAS_LENGTH, path, 256),
            bos_token_id=_int_field(fields, "tokenizer.ggml.bos_token_id", path, 2),
            pad_token_id=_int_field(fields, "tokenizer.ggml.padding_token_id", path, 0),
            eos_token_id=_eos_ids(fields, int(vocab)),
        )
    except ConfigError as e:
        raise FormatError(f"{path}: inconsistent metadata: {e}") from None


def _eos_ids(fields: Mapping[str, Any], vocab: int) -> list[int]:
    """tokenizer.ggml.eos_token_ids when written; otherwise DiffusionGemma's {1, 106, 50} (spec
    §1.5: the Unsloth files carry only one eos id and unreliable token types)."""
    ids = fields.get(Keys.EOS_IDS)
    if isinstance(ids, list) and ids:
        return [int(i) for i in ids]
    return [i for i in (1, 106, 50) if i < vocab]


def _rope_fraction(freqs: Any, d_full: int, path: Path) -> float:
    """The rotated fraction of full-layer heads from rope_freqs (1.0 = rotate, >= 1e29 = not)."""
    if freqs is None:
        return DEFAULT_ROPE[FULL]["partial_rotary_factor"]
    values = np.asarray(freqs.data, np.float32).reshape(-1) if freqs.tensor_type.name == "F32" else None
    if values is None or values.shape != (d_full // 2,):
        raise FormatError(f"{path}: tensor {ROPE_FREQS} must be F32 [{d_full // 2}]")
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


def canonical_tensors(stored: Mapping[str, Any], cfg: DiffusionGemmaConfig, path: Path) -> dict[str, Any]:
    """Canonical HF name -> array or GGUFTensor, each checked against the config's shapes."""
    from portable_dg.checkpoint import expected_tensors

    out = {}
    for name, shape in expected_tensors(cfg).items():
        tensor = _find_tensor(name, stored, path)
        if tuple(tensor.shape) != shape:
            raise FormatError(f"{path}: tensor {tensor.name} has HF shape {list(tensor.shape)}, "
                              f"expected {list(shape)} (for {name})")
        out[name] = tensor.data.view(np.float32 if tensor.qtype == "F32" else np.float16).reshape(shape) \
            if tensor.qtype in ("F32", "F16") else tensor
    return out


def _find_tensor(name: str, stored: Mapping[str, Any], path: Path) -> GGUFTensor:
    """The stored tensor of a canonical name, with PR #24427's names and split experts accepted."""
    gname = gguf_name(name)
    candidates = [gname]
    if gname == GLOBAL_TENSORS[DEC + "self_conditioning.pre_norm.weight"]:
        candidates = list(SC_PRE_NORM_ALIASES)
    elif gname.endswith(ENC_SCALAR_GGUF):   # PR #24427 exports no encoder scalar: use the decoder's
        candidates.append(gname.replace(ENC_SCALAR_GGUF, LAYER_TENSORS["layer_scalar"]))
    for candidate in candidates:
        if candidate in stored:
            return _stored_tensor(stored[candidate], path)
    if gname.endswith("ffn_gate_up_exps.weight"):
        block = gname.rsplit(".", 2)[0]
        parts = [stored.get(f"{block}.{p}") for p in SPLIT_EXPERTS]
        if all(p is not None for p in parts):
            return _fuse_experts([_stored_tensor(p, path) for p in parts], gname)
    raise FormatError(f"{path}: missing tensor {gname} (for {name})")


def _fuse_experts(parts: list[GGUFTensor], name: str) -> GGUFTensor:
    """ffn_gate_exps + ffn_up_exps [E, I, H] each -> the fused [E, 2I, H] (gate rows first)."""
    gate, up = parts
    if gate.qtype == up.qtype and gate.shape == up.shape:
        data = np.concatenate([gate.data, up.data], axis=1)             # [E, 2I, row_bytes]
        return GGUFTensor(name, (gate.shape[0], 2 * gate.shape[1], gate.shape[2]), gate.qtype,
                          gate.ggml_type, data)
    values = np.concatenate([gate.dequantize(), up.dequantize()], axis=1)  # [E, 2I, H] float32
    return GGUFTensor(name, values.shape, "F32", 0, values.view(np.uint8))


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """An importance matrix written by `pdg imatrix` (.npz: GGUF tensor name -> mean x^2 per input
    column, [in] or [E, in] for expert tensors)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: np.asarray(z[k], np.float32) for k in z.files}
    except FileNotFoundError:
        raise ConfigError(f"{path}: imatrix file not found") from None
    except (ValueError, OSError) as e:
        raise FormatError(f"{path}: not an imatrix .npz file ({e})") from None
    bad = [k for k, v in out.items() if not np.isfinite(v).all() or (v < 0).any()]
    if bad:
        raise FormatError(f"{path}: imatrix entry {bad[0]} has negative or non-finite values")
    return out


# --- inspection -------------------------------------------------------------------------------

def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What `pdg info` prints for a GGUF file.

    Returns: {"path", "file_size" (bytes), "architecture", "file_type" (llama_ftype int or None),
    "n_tensors", "n_parameters", "tensor_bytes", "bits_per_weight" (over all tensors),
    "types": {qtype: {"tensors", "parameters", "bytes"}} (largest first),
    "metadata": {key: value} with arrays longer than 16 items summarised as "[TYPE x N]"}."""
    path = Path(path)
    reader = open_gguf(path)
    types: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        entry = types.setdefault(t.tensor_type.name, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += int(t.n_elements)
        entry["bytes"] += int(t.n_bytes)
    n_params = sum(e["parameters"] for e in types.values())
    n_bytes = sum(e["bytes"] for e in types.values())
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0].name == "ARRAY" and len(field.data) > 16:
            metadata[key] = f"[{field.types[-1].name} x {len(field.data)}]"
        else:
            metadata[key] = field.contents()
    return {
        "path": str(path), "file_size": path.stat().st_size,
        "architecture": metadata.get("general.architecture"),
        "file_type": metadata.get("general.file_type"),
        "n_tensors": len(reader.tensors), "n_parameters": n_params, "tensor_bytes": n_bytes,
        "bits_per_weight": 8 * n_bytes / n_params if n_params else 0.0,
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "metadata": metadata,
    }
