"""Reading Hugging Face checkpoints: lazy, memory-mapped safetensors, and the sanitize step.

`open_safetensors` parses the header itself (so a truncated or malformed file gets an error naming
it) and memory-maps each tensor; nothing is read until a tensor's `load()`.  `sanitize` maps stored
names to the canonical names the model uses: the Hugging Face stored names (`model.decoder.*` and
the encoder's `layer_scalar`s), with the vision tower, the untied `lm_head` and encoder duplicates
of tied weights dropped (spec §2).  `expected_tensors` lists every canonical name with its shape.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import DiffusionGemmaConfig
from .errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 stored as uint16 to float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


@dataclass
class BF16Tensor:
    """A bfloat16 tensor as stored (uint16 bit patterns, memory-mapped), for backends that keep
    bfloat16 weights as they are; `dequantize()` widens it to float32 for the others."""

    bits: np.ndarray            # uint16 [*shape]
    qtype = "bf16"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    def dequantize(self) -> np.ndarray:
        return bf16_to_f32(self.bits)


@dataclass
class TensorRef:
    """A tensor inside a safetensors file, read on demand through a memory map."""

    path: Path
    name: str
    dtype: str                 # safetensors dtype string ("BF16", "F32", ...)
    shape: tuple[int, ...]
    offset: int                # absolute byte offset in the file
    nbytes: int

    def raw(self) -> np.ndarray:
        """The stored elements (bf16 as uint16, fp8 as uint8), memory-mapped, read-only."""
        dtype = np.dtype(SAFETENSORS_DTYPES[self.dtype])
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=self.shape)

    def load(self) -> np.ndarray:
        """The tensor as a numpy float array (bf16 widened to float32; other floats as stored)."""
        if self.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {self.name} has dtype {self.dtype}; "
                                  f"expected one of {', '.join(FLOAT_DTYPES)}")
        data = self.raw()
        return bf16_to_f32(data) if self.dtype == "BF16" else data

    def stored(self) -> np.ndarray | BF16Tensor:
        """`load()`, except that bfloat16 stays bfloat16 (a BF16Tensor): no float32 copy on the host."""
        return BF16Tensor(self.raw()) if self.dtype == "BF16" else self.load()


def open_safetensors(path: str | Path) -> dict[str, TensorRef]:
    """Parse one safetensors file's header and return lazy references to its tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header "
                                      f"(claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    refs = {name: tensor_ref(path, name, info, base) for name, info in header.items() if name != "__metadata__"}
    check_layout(path, refs.values(), base, size)
    return refs


def tensor_ref(path: Path, name: str, info: Any, base: int) -> TensorRef:
    """One header entry as a TensorRef, its shape and offsets checked against its dtype."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name} "
                              "(expected dtype, shape and data_offsets)") from None
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
        raise CheckpointError(f"{path}: tensor {name} has shape {shape!r}; expected a list of "
                              "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name} has data_offsets {offsets!r}; expected "
                              "[start, end] with 0 <= start <= end")
    start, end = offsets
    nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize   # exact: no int64 wrap
    if end - start != nbytes:
        raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape "
                              f"{shape} {dtype} (expected {nbytes})")
    return TensorRef(path, name, dtype, tuple(shape), base + start, nbytes)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_layout(path: Path, refs: Any, base: int, size: int) -> None:
    """The tensors' bytes must tile the data section exactly, as the safetensors library requires:
    no overlap, no hole, nothing past the end of the file."""
    end = base
    for ref in sorted(refs, key=lambda r: (r.offset, r.nbytes)):
        if ref.offset < end:
            raise CheckpointError(f"{path}: tensor {ref.name} overlaps the tensor before it "
                                  f"(starts at byte {ref.offset}, the previous one ends at {end})")
        if ref.offset > end:
            raise CheckpointError(f"{path}: corrupt: {ref.offset - end} unused bytes before tensor "
                                  f"{ref.name} (at byte {end})")
        end = ref.offset + ref.nbytes
        if end > size:
            raise CheckpointError(f"{path}: truncated: tensor {ref.name} ends at byte {end}, "
                                  f"the file has {size}")
    if end != size:
        raise CheckpointError(f"{path}: corrupt: {size - end} bytes after the last tensor")


def open_checkpoint(directory: str | Path) -> dict[str, TensorRef]:
    """All tensors of a checkpoint directory: `model.safetensors.index.json` shards, or every
    `*.safetensors` file when there is no index."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: invalid index (expected a JSON object with weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        weight_map = None
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files")
    refs: dict[str, TensorRef] = {}
    for f in files:
        refs.update(open_safetensors(directory / f))
    if weight_map is not None:
        absent = [name for name, f in weight_map.items() if name not in refs]
        if absent:
            raise CheckpointError(f"{index}: tensor {absent[0]} is listed in the index but missing "
                                  f"from {weight_map[absent[0]]}")
    return refs


DROPPED = re.compile(r"^(lm_head\.|model\.encoder\.(vision_tower|embed_vision|audio_tower|embed_audio)\.)"
                     r"|rotary_emb|\.(input|output)_(min|max)$")
ENCODER_TEXT = re.compile(r"^model\.encoder\.language_model\.(.*)$")


def sanitize(tensors: Mapping[str, TensorRef]) -> dict[str, TensorRef]:
    """Map stored names to canonical names.

    Drops the vision/audio towers, `lm_head.weight` (tied to the embedding) and rotary buffers;
    of `model.encoder.language_model.*` keeps only the encoder's own `layers.{i}.layer_scalar`
    (its other tensors are tied copies of the decoder's); accepts mlx-vlm's `experts.*_proj.weight`
    spelling of the fused experts."""
    out = {}
    for name, ref in tensors.items():
        if DROPPED.search(name):
            continue
        m = ENCODER_TEXT.match(name)
        if m and not re.fullmatch(r"layers\.\d+\.layer_scalar", m.group(1)):
            continue
        name = re.sub(r"\.experts\.(gate_up_proj|down_proj)\.weight$", r".experts.\1", name)
        out[name] = ref
    return out


def expected_tensors(cfg: DiffusionGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical text tensor of a checkpoint with this config, and its shape ([out, in])."""
    H, I, M, E = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.num_experts
    d = "model.decoder."
    shapes = {
        d + "embed_tokens.weight": (cfg.vocab_size, H),
        d + "norm.weight": (H,),
        d + "self_conditioning.pre_norm.weight": (H,),
        d + "self_conditioning.gate_proj.weight": (I, H),
        d + "self_conditioning.up_proj.weight": (I, H),
        d + "self_conditioning.down_proj.weight": (H, I),
    }
    for i, g in enumerate(cfg.layers):
        p = f"{d}layers.{i}."
        nq, nkv = cfg.num_attention_heads * g.head_dim, g.num_kv_heads * g.head_dim
        shapes.update({
            p + "self_attn.q_proj.weight": (nq, H),
            p + "self_attn.k_proj.weight": (nkv, H),
            p + "self_attn.o_proj.weight": (H, nq),
            p + "self_attn.q_norm.weight": (g.head_dim,),
            p + "self_attn.k_norm.weight": (g.head_dim,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
            p + "router.proj.weight": (E, H),
            p + "router.scale": (H,),
            p + "router.per_expert_scale": (E,),
            p + "experts.gate_up_proj": (E, 2 * M, H),
            p + "experts.down_proj": (E, H, M),
            p + "layer_scalar": (1,),
            f"model.encoder.language_model.layers.{i}.layer_scalar": (1,),
        })
        if g.has_v_proj:
            shapes[p + "self_attn.v_proj.weight"] = (nkv, H)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_2", "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (H,)
    return shapes


def check_tensors(tensors: Mapping[str, Any], cfg: DiffusionGemmaConfig, source: str,
                  quantized_as: str = "") -> None:
    """Raise CheckpointError naming the first missing, misshaped or non-float tensor.

    Values are TensorRefs or quantized tensor objects (anything with the logical `shape`); a
    stored TensorRef must be a float.  quantized_as names what would have made a non-float
    tensor a quantized one in this format (e.g. "a weight_scale"), for the error message."""
    for name, shape in expected_tensors(cfg).items():
        ref = tensors.get(name)
        if ref is None:
            raise CheckpointError(f"{source}: missing tensor {name} (expected shape {list(shape)})")
        if tuple(ref.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(ref.shape)}, "
                                  f"expected {list(shape)}")
        if isinstance(ref, TensorRef) and ref.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: tensor {name} has dtype {ref.dtype}"
                                  f"{f' and no {quantized_as}' if quantized_as else ''}; "
                                  f"expected one of {', '.join(FLOAT_DTYPES)}")


def resolve_model_path(path_or_repo_id: str | os.PathLike) -> Path:
    """A local file or directory as is; otherwise a hub repo id downloaded into the HF cache
    (resumable, with a progress bar, honouring HF_HUB_OFFLINE)."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "/")):
        raise CheckpointError(f"{text}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{text}: not a local path, and huggingface-hub is not installed") from None
    try:
        return Path(snapshot_download(text, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.gguf"]))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{text}: not a local path and not in the Hugging Face cache "
                              "(HF_HUB_OFFLINE is set or the hub cannot be reached)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{text}: download failed: {str(e).splitlines()[0]}") from None
