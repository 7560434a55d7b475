"""MLX model directories in the layout mlx-vlm writes for diffusion_gemma (spec/file_formats.md §2).

`convert_to_mlx` turns a Hugging Face checkpoint into such a directory: Hugging Face names (fused
experts renamed `experts.*_proj.weight`), safetensors shards plus `model.safetensors.index.json`,
and a config.json whose `quantization` block (copied to `quantization_config`) lets mlx-lm,
mlx-vlm and `read_mlx` rebuild the quantized structure.  `read_mlx` reads directories made by it or
by mlx-vlm (mlx-community uploads) into a `ModelSource` whose quantized tensors stay packed
(`MLXQuantized`); the MLX backend multiplies them as they are, other backends dequantize them.

Quantization follows mlx-vlm's diffusion_gemma `quant_predicate`: the embedding, attention, dense
MLP and router projection get 8-bit affine with groups of 64 whatever the default; the experts get
the requested mode.  Two mixes differ in the routing and self-conditioning path: "portable" (the
default) keeps the router projection and the self-conditioning MLP in float, so expert choice and
the feedback of the previous step's logits are not disturbed by quantization; "mlx-vlm" quantizes
them as mlx-vlm does (router 8-bit, self-conditioning MLP at the requested mode), reproducing the
mlx-community files exactly.  Both load in mlx-vlm/mlx-lm, which quantize a module iff its
`.scales` exist.  Norms, router scales and layer scalars are never quantized.  The embedding
stays 8-bit *affine* even in mxfp4 files because mlx-vlm's
self-conditioning multiplies the probabilities by the packed table without passing a mode
(spec §2.4): an mxfp4 embedding would be read as affine there and break self-conditioning.

Quantizing uses `mx.quantize` itself (so the codes are bit-identical to mlx-lm's), so quantized
conversion needs the `mlx` package; `--quant none|bf16` and reading need only numpy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from portable_dg.checkpoint import (FLOAT_DTYPES, TensorRef, bf16_to_f32, check_tensors, expected_tensors,
                                    open_checkpoint, resolve_model_path, sanitize)
from portable_dg.config import FULL, DiffusionGemmaConfig, read_json
from portable_dg.errors import CheckpointError, ConfigError, FormatError
from portable_dg.outputs import check_new_directory, output_directory
from portable_dg.progress import Progress
from portable_dg.safetensors_writer import Entry, f32_to_bf16_bits, split_shards, write_index, write_safetensors

# --quant -> (mode, bits, default group size), None = not quantized
QUANTS: dict[str, tuple[str, int, int] | None] = {
    "none": None, "bf16": None, "f16": None,
    "q4": ("affine", 4, 64), "q6": ("affine", 6, 64), "q8": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
}
GROUP_SIZES = {"affine": (32, 64, 128), "mxfp4": (32,)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
# mlx-vlm diffusion_gemma quant_predicate: these modules are always 8-bit affine g64
HIGH_PRECISION = {"group_size": 64, "bits": 8, "mode": "affine"}
MAX_SHARD_BYTES = 5 << 30          # mlx-lm's shard limit
COPIED_FILES = ("*.json", "*.jinja", "*.txt", "tokenizer.model")
ENCODER_TEXT = re.compile(r"^model\.encoder\.language_model\.(.*)$")
NON_TEXT = re.compile(r"^model\.encoder\.(vision_tower|embed_vision|audio_tower|embed_audio)\.")
CHUNK_VALUES = 1 << 24          # values converted and quantized at a time (64 MiB as float32)
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


# --- the quantized tensor --------------------------------------------------------------------------
def qtype_name(mode: str, bits: int, group_size: int) -> str:
    """"affine4g64", "mxfp4g32", ..."""
    return f"{mode}{bits if mode == 'affine' else ''}g{group_size}"


@dataclass
class MLXQuantized:
    """One tensor quantized by `mx.quantize`, kept packed.

    Codes run along the last (input) axis in groups of `group_size`; affine: w = code * scale + bias,
    mxfp4: w = E2M1(code) * 2^(scale - 127)."""

    shape: tuple[int, ...]          # logical shape [..., out, in]
    weight: np.ndarray              # uint32 [..., out, in * bits / 32], a little-endian bit stream per row
    scales: np.ndarray              # float32 (affine) or uint8 E8M0 (mxfp4) [..., out, in / group_size]
    biases: np.ndarray | None       # float32 [..., out, in / group_size]; affine only
    group_size: int
    bits: int
    mode: str                       # "affine" or "mxfp4"

    @property
    def qtype(self) -> str:
        """Short name, e.g. "affine4g64" or "mxfp4g32"."""
        return qtype_name(self.mode, self.bits, self.group_size)

    def codes(self) -> np.ndarray:
        """The unpacked integer codes [..., out, in] (uint8)."""
        bits = np.unpackbits(np.ascontiguousarray(self.weight).view(np.uint8), axis=-1, bitorder="little")
        bits = bits.reshape(*self.shape, self.bits)                       # [..., out, in, bits]
        return (bits << np.arange(self.bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)

    def dequantize(self) -> np.ndarray:
        """The float32 tensor [..., out, in]."""
        *lead, n_in = self.shape
        groups = self.codes().reshape(*lead, n_in // self.group_size, self.group_size)
        if self.mode == "mxfp4":
            scale = np.ldexp(np.float32(1), self.scales.astype(np.int32) - 127).astype(np.float32)
            values = E2M1[groups] * scale[..., None]
        else:
            values = groups * self.scales[..., None] + self.biases[..., None]
        return values.reshape(self.shape).astype(np.float32)


@dataclass
class QuantizedRef:
    """The stored parts of one quantized module, read on `load()`."""

    shape: tuple[int, ...]
    weight: TensorRef
    scales: TensorRef
    biases: TensorRef | None
    params: dict[str, Any]

    @property
    def dtype(self) -> str:
        """The storage type `pdg info` counts (the qtype)."""
        return qtype_name(self.params["mode"], self.params["bits"], self.params["group_size"])

    def load(self) -> MLXQuantized:
        return MLXQuantized(self.shape, np.asarray(self.weight.raw()), float_or_raw(self.scales),
                            None if self.biases is None else float_or_raw(self.biases),
                            int(self.params["group_size"]), int(self.params["bits"]), self.params["mode"])


def float_or_raw(ref: TensorRef) -> np.ndarray:
    """Float tensors widened to float32 (exact); others (uint8 E8M0 scales) as stored."""
    return np.asarray(ref.load(), np.float32) if ref.dtype in FLOAT_DTYPES else np.asarray(ref.raw())


# --- reading -----------------------------------------------------------------------------------------
def read_mlx(path: Path):
    """An MLX model directory (ours or mlx-vlm's) -> ModelSource with packed quantized tensors."""
    from portable_dg.source import LazyTensors, ModelSource, read_configs
    from portable_dg.tokenizer import Tokenizer

    path = Path(path)
    raw_config, config, generation = read_configs(path)
    qconfig = quantization_block(raw_config, path)
    refs = open_checkpoint(path)
    expected = expected_tensors(config)
    stored: dict[str, Any] = {}
    for name, ref in refs.items():
        if name.endswith((".scales", ".biases")) or NON_TEXT.match(name):
            continue
        canonical = next(iter(sanitize({name: ref})), None)
        if canonical is None or canonical not in expected:
            stored[name] = ref
            continue
        module = name[:-len(".weight")] if name.endswith(".weight") else name
        params = module_params(module, qconfig, refs, path)
        stored[name] = ref if params is None else quantized_ref(module, expected[canonical], refs, params, path)
    tensors = sanitize(stored)
    check_tensors(tensors, config, str(path), quantized_as=".scales")
    metadata = {"synthetic": bool(raw_config.get("portable_dg_synthetic", False)),
                "quantization": {k: qconfig[k] for k in ("mode", "bits", "group_size")},
                "dtypes": sorted({t.dtype for t in refs.values()})}
    return ModelSource(config, generation, LazyTensors({n: tensors[n] for n in expected}),
                       Tokenizer.from_directory(path), "mlx", path, metadata)


def quantization_block(raw_config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """config["quantization"] with its defaults checked (mode defaults to affine)."""
    q = raw_config.get("quantization")
    if not isinstance(q, dict) or not isinstance(q.get("bits"), int) or not isinstance(q.get("group_size"), int):
        raise FormatError(f"{path / 'config.json'}: \"quantization\" must be an object with integer "
                          f"\"bits\" and \"group_size\", got {q!r}")
    q = {**q, "mode": q.get("mode", "affine")}
    check_params(q, f"{path / 'config.json'}: quantization")
    return q


def check_params(params: Mapping[str, Any], where: str) -> None:
    """Raise FormatError unless (mode, bits, group_size) is a scheme this runtime reads."""
    mode, bits, gs = params.get("mode"), params.get("bits"), params.get("group_size")
    ok = ((mode == "affine" and bits in AFFINE_BITS and gs in GROUP_SIZES["affine"])
          or (mode == "mxfp4" and bits == 4 and gs == 32))
    if not ok:
        raise FormatError(f"{where}: unsupported quantization mode={mode!r} bits={bits!r} group_size={gs!r} "
                          f"(supported: affine {AFFINE_BITS} bits with groups {GROUP_SIZES['affine']}, "
                          "mxfp4 4 bits with groups of 32)")


def module_params(module: str, qconfig: Mapping[str, Any], refs: Mapping[str, TensorRef],
                  path: Path) -> dict[str, Any] | None:
    """(mode, bits, group_size) of one module, or None when it is stored unquantized.

    mlx-lm's rule: a per-module entry wins (a dict: those parameters, mode affine unless given;
    False: not quantized); otherwise the module is quantized iff `<module>.scales` exists."""
    entry = qconfig.get(module)
    has_scales = module + ".scales" in refs
    if entry is False or (entry is None and not has_scales):
        if has_scales:
            raise FormatError(f"{path}: {module} has .scales but config.json quantization says "
                              "it is not quantized")
        return None
    params = {k: qconfig[k] for k in ("group_size", "bits", "mode")}
    if isinstance(entry, dict):
        params = {"mode": "affine", **{k: entry[k] for k in ("group_size", "bits", "mode") if k in entry}}
    if not has_scales:
        raise FormatError(f"{path}: config.json quantization lists {module} as {params} but "
                          f"{module}.scales is missing")
    check_params(params, f"{path / 'config.json'}: quantization of {module}")
    return params


def quantized_ref(module: str, shape: tuple[int, ...], refs: Mapping[str, TensorRef],
                  params: dict[str, Any], path: Path) -> QuantizedRef:
    """Check the stored parts of a quantized module against its parameters and logical shape."""
    weight, scales, biases = (refs.get(f"{module}.{p}") for p in ("weight", "scales", "biases"))
    mode, bits, gs = params["mode"], params["bits"], params["group_size"]
    n_in = shape[-1]
    want_w = (*shape[:-1], n_in * bits // 32)
    want_s = (*shape[:-1], n_in // gs)
    problems = []
    if n_in % gs or (n_in * bits) % 32:
        problems.append(f"input size {n_in} is not a multiple of the group size {gs}")
    if weight is None or weight.dtype != "U32" or tuple(weight.shape) != want_w:
        problems.append(f"weight should be U32 {list(want_w)}, found "
                        f"{'nothing' if weight is None else f'{weight.dtype} {list(weight.shape)}'}")
    scale_ok = scales.dtype == "U8" if mode == "mxfp4" else scales.dtype in FLOAT_DTYPES
    if tuple(scales.shape) != want_s or not scale_ok:
        problems.append(f"scales should be {'U8' if mode == 'mxfp4' else 'float'} {list(want_s)}, "
                        f"found {scales.dtype} {list(scales.shape)}")
    if (biases is not None) != (mode == "affine"):
        problems.append("biases are stored only for affine quantization")
    elif biases is not None and (tuple(biases.shape) != want_s or biases.dtype not in FLOAT_DTYPES):
        problems.append(f"biases should be float {list(want_s)}, found {biases.dtype} {list(biases.shape)}")
    if problems:
        raise FormatError(f"{path}: {module}: the tensors do not match the quantization config "
                          f"({mode}, {bits} bits, groups of {gs}; logical shape {list(shape)}): "
                          + "; ".join(problems))
    return QuantizedRef(tuple(shape), weight, scales, biases, params)


# --- writing -----------------------------------------------------------------------------------------
@dataclass
class Planned:
    """One output tensor (or quantized module) of a conversion."""

    name: str                        # output name (mlx-vlm spelling)
    ref: TensorRef                   # the source tensor
    float_dtype: str                 # "F32", "F16" or "BF16": the stored float dtype (and scales')
    quant: dict[str, Any] | None     # {"group_size", "bits", "mode"} or None

    def parts(self) -> list[Entry]:
        """Every stored tensor of this output (weight, and scales/biases when quantized)."""
        shape = tuple(self.ref.shape)
        if self.quant is None:
            return [Entry(self.name, self.float_dtype, shape)]
        module = self.name[:-len(".weight")]
        n_in, bits, gs = shape[-1], self.quant["bits"], self.quant["group_size"]
        small = (*shape[:-1], n_in // gs)
        parts = [Entry(self.name, "U32", (*shape[:-1], n_in * bits // 32)),
                 Entry(module + ".scales", "U8" if self.quant["mode"] == "mxfp4" else self.float_dtype, small)]
        if self.quant["mode"] == "affine":
            parts.append(Entry(module + ".biases", self.float_dtype, small))
        return parts


def mlx_name(hf_name: str) -> str | None:
    """The name mlx-vlm's sanitize gives a stored Hugging Face tensor, or None if it drops it."""
    if hf_name.startswith("lm_head.") or "rotary_emb" in hf_name:
        return None
    m = ENCODER_TEXT.match(hf_name)
    if m and not re.fullmatch(r"layers\.\d+\.layer_scalar", m.group(1)):
        return None
    return re.sub(r"\.experts\.(gate_up_proj|down_proj)$", r".experts.\1.weight", hf_name)


def is_high_precision(module: str) -> bool:
    """mlx-vlm's diffusion_gemma quant_predicate: modules kept at 8-bit affine g64."""
    return (module.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
            or ".self_attn." in module or "router" in module)


MIXES = ("portable", "mlx-vlm")


def kept_float(module: str, mix: str) -> bool:
    """The "portable" mix keeps the routing and self-conditioning projections in float."""
    return mix == "portable" and (module.endswith("router.proj") or ".self_conditioning." in module)


def quant_params(name: str, shape: tuple[int, ...], default: dict[str, Any] | None,
                 mix: str = "portable") -> dict[str, Any] | None:
    """The choice for one tensor: None (kept float), the default, or the 8-bit override.

    Like mlx-lm, a module whose input size is not a multiple of its group size stays float."""
    if default is None or len(shape) < 2 or not name.endswith(".weight") or NON_TEXT.match(name):
        return None
    if kept_float(name[:-len(".weight")], mix):
        return None
    params = HIGH_PRECISION if is_high_precision(name[:-len(".weight")]) else default
    return None if shape[-1] % params["group_size"] else dict(params)


def plan_conversion(refs: Mapping[str, TensorRef], quant: str, group_size: int | None,
                    mix: str = "portable") -> list[Planned]:
    """Every output tensor of converting `refs` with `--quant quant`, sorted by name."""
    scheme = QUANTS[quant]
    default = None if scheme is None else {"group_size": group_size or scheme[2], "bits": scheme[1],
                                           "mode": scheme[0]}
    plan = []
    for hf_name, ref in sorted(refs.items()):
        name = mlx_name(hf_name)
        if name is None:
            continue
        if ref.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{ref.path}: tensor {hf_name} has dtype {ref.dtype}; a Hugging Face "
                                  f"source must hold float tensors ({', '.join(FLOAT_DTYPES)})")
        float_dtype = {"bf16": "BF16", "f16": "F16"}.get(quant, "F32" if ref.dtype == "F64" else ref.dtype)
        plan.append(Planned(name, ref, float_dtype, quant_params(name, tuple(ref.shape), default, mix)))
    return sorted(plan, key=lambda p: p.name)


def quantization_config(plan: list[Planned], quant: str, group_size: int | None) -> dict[str, Any] | None:
    """config["quantization"]: the default parameters plus one entry per module the predicate
    overrode (keyed by module path without `.weight`), as mlx-vlm writes it."""
    scheme = QUANTS[quant]
    if scheme is None:
        return None
    block: dict[str, Any] = {"group_size": group_size or scheme[2], "bits": scheme[1], "mode": scheme[0]}
    for p in plan:
        module = p.name[:-len(".weight")]
        if p.quant is not None and is_high_precision(module):
            block[module] = dict(p.quant)
    return block


def row_chunks(ref: TensorRef, dtype: str) -> Iterator[np.ndarray]:
    """A source tensor as [rows, in] chunks of about CHUNK_VALUES values, in the stored float
    dtype `dtype` (bf16 as uint16 bit patterns); rows are read from the memory map as needed."""
    raw = ref.raw()
    flat = raw.reshape(-1, raw.shape[-1]) if raw.ndim else raw.reshape(1, 1)      # [rows, in]
    step = max(1, CHUNK_VALUES // max(flat.shape[1], 1))
    for a in range(0, flat.shape[0], step):
        chunk = flat[a:a + step]
        if dtype == ref.dtype:
            yield np.asarray(chunk)
            continue
        values = bf16_to_f32(chunk) if ref.dtype == "BF16" else np.asarray(chunk, np.float32)
        yield f32_to_bf16_bits(values) if dtype == "BF16" else values.astype(
            {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype])


def encode(p: Planned) -> Iterator[np.ndarray]:
    """The stored bytes of one planned tensor, in `p.parts()` order, a chunk of rows at a time:
    a quantized module's codes chunk by chunk, then its scales, then its biases."""
    if p.quant is None:
        yield from row_chunks(p.ref, p.float_dtype)
        return
    import mlx.core as mx

    small: list[list[np.ndarray]] = [[], []]                 # scales, biases: an eighth of the codes or less
    for chunk in row_chunks(p.ref, p.float_dtype):
        w = mx.array(chunk).view(mx.bfloat16) if p.float_dtype == "BF16" else mx.array(chunk)
        packed = mx.quantize(w, group_size=p.quant["group_size"], bits=p.quant["bits"], mode=p.quant["mode"])
        yield np.array(packed[0])
        for kept, part in zip(small, packed[1:]):
            kept.append(np.array(part.view(mx.uint16)) if part.dtype == mx.bfloat16 else np.array(part))
    for kept in small:
        if kept:
            yield np.concatenate(kept)


def stored_entries(group: list[Planned]) -> list[Entry]:
    """The safetensors entries of a group of planned outputs, in order."""
    return [e for p in group for e in p.parts()]


def write_shard(path: Path, plan: list[Planned], metadata: dict[str, str], progress: Progress) -> None:
    """Write one safetensors file, encoding one planned tensor at a time."""
    def chunks() -> Iterator[np.ndarray]:
        for p in plan:
            for chunk in encode(p):
                yield chunk
                progress.update(chunk.nbytes)
    write_safetensors(path, stored_entries(plan), chunks(), metadata)


def output_config(src_config: dict[str, Any], config: DiffusionGemmaConfig, qblock: dict[str, Any] | None,
                  quant: str, src: Path, has_vision: bool) -> dict[str, Any]:
    """The source config.json as mlx-vlm reads it, plus the quantization blocks and a record of the
    conversion.

    mlx-vlm's TextConfig knows only the released form of the full-attention geometry
    (`global_head_dim`, `num_global_key_value_heads`); a config saved by transformers 5.23 has
    `per_layer_config` alone, so the released keys are written beside it.  `vision_config` stays
    only when the vision tower's weights are in the output; otherwise it is null (mlx-vlm builds a
    default tower when the key is absent, and its strict loader then refuses the missing weights)."""
    out = {k: v for k, v in src_config.items() if k != "_name_or_path"}
    nested = isinstance(out.get("text_config"), dict)
    text = dict(out["text_config"]) if nested else out
    full = next((g for g in config.layers if g.kind == FULL), None)
    if full is not None:
        text["global_head_dim"], text["num_global_key_value_heads"] = full.head_dim, full.num_kv_heads
    if nested:
        out["text_config"] = text
    if not has_vision:
        out["vision_config"] = None
    if qblock is not None:
        out["quantization"] = qblock
        out["quantization_config"] = dict(qblock)
    out["portable_dg_conversion"] = {"format": "mlx", "quant": quant, "source": src.name}
    return out


def convert_to_mlx(src: str | os.PathLike, dst: str | os.PathLike, quant: str = "q4",
                   group_size: int | None = None, *, mix: str = "portable", imatrix: str | None = None,
                   progress: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Convert a Hugging Face DiffusionGemma checkpoint directory into an MLX model directory.

    Args:
        src: the Hugging Face checkpoint directory (or hub repo id).
        dst: the directory to create; it must not exist (or be empty).  Written into a temporary
            directory next to it and renamed at the end, so a failure leaves nothing behind.
        quant: "none" (keep dtypes), "bf16", "f16", "q4", "q6", "q8" (affine) or "mxfp4"
            (any case).
        group_size: group size of the default quantization (affine 32/64/128, default 64;
            mxfp4 32).  The 8-bit overrides always use 64.
        mix: "portable" (router projection and self-conditioning MLP kept float) or "mlx-vlm"
            (quantized as the mlx-community files are).
        imatrix: not used by MLX quantization (accepted for `pdg convert`'s common call;
            giving one is an error).
        progress: report progress on stderr (bytes written).
        max_shard_bytes: the largest safetensors shard (mlx-lm's 5 GiB by default).
    Returns:
        dst as a Path.
    """
    from portable_dg.source import read_hf, resolved_generation_config

    quant = quant.lower()
    if imatrix is not None:
        raise ConfigError("--imatrix applies to GGUF quantization; MLX quantization (mx.quantize) does not use one")
    check_options(quant, group_size)
    if mix not in MIXES:
        raise ConfigError(f"unknown MLX quantization mix {mix!r}; expected one of {', '.join(MIXES)}")
    src = resolve_model_path(src)
    if not (src.is_dir() and (src / "config.json").exists()):
        raise ConfigError(f"{src}: the source must be a Hugging Face checkpoint directory")
    dst = check_new_directory(dst, sources=[src])
    config = read_hf(src).config                           # validates config, tensors, tokenizer
    src_config = read_json(src / "config.json")
    if "quantization" in src_config:
        raise FormatError(f"{src}: already an MLX quantized directory; convert from the Hugging Face checkpoint")
    plan = plan_conversion(open_checkpoint(src), quant, group_size, mix)
    if any(p.quant is not None for p in plan):
        require_mlx()
    shards = split_shards(plan, lambda p: sum(e.nbytes for e in p.parts()), max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(e.nbytes for p in plan for e in p.parts())
    with output_directory(dst, sources=[src]) as tmp, \
            Progress(total, f"convert {dst.name} (mlx {quant})", enabled=progress) as bar:
        for f, group in zip(files, shards):
            write_shard(tmp / f, group, {"format": "mlx"}, bar)
        write_index(tmp, [(f, stored_entries(g)) for f, g in zip(files, shards)],
                    total_parameters=sum(int(np.prod(p.ref.shape)) for p in plan))
        for pattern in COPIED_FILES:
            for path in src.glob(pattern):
                if path.name not in ("config.json", "model.safetensors.index.json"):
                    shutil.copy2(path, tmp / path.name)
        write_json(tmp / "generation_config.json", resolved_generation_config(src))
        has_vision = any(NON_TEXT.match(p.name) for p in plan)
        qblock = quantization_config(plan, quant, group_size)
        write_json(tmp / "config.json", output_config(src_config, config, qblock, quant, src, has_vision))
    return dst


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_options(quant: str, group_size: int | None) -> None:
    """Raise ConfigError on an unusable quant mode or group size."""
    if quant not in QUANTS:
        raise ConfigError(f"unsupported --quant {quant!r}; expected one of {', '.join(QUANTS)}")
    scheme = QUANTS[quant]
    if group_size is not None:
        if scheme is None:
            raise ConfigError(f"--group-size applies to quantized modes only, not --quant {quant}")
        if group_size not in GROUP_SIZES[scheme[0]]:
            raise ConfigError(f"--group-size {group_size} is not valid for {quant}; expected one of "
                              f"{', '.join(map(str, GROUP_SIZES[scheme[0]]))}")


def require_mlx() -> None:
    """Quantized conversion calls mx.quantize (bit-identical to mlx-lm's files)."""
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        from portable_dg.errors import BackendUnavailable
        raise BackendUnavailable("quantized MLX conversion needs the mlx package: "
                                 "pip install 'portable-dg[mlx]' (--quant none|bf16 does not)") from None
