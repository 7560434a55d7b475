"""FP8 e4m3 checkpoints for the PyTorch backend (and vLLM): the converter and the reader.

Layout (spec/file_formats.md §3.2): `RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic`'s compressed-tensors
"float-quantized" FP8-dynamic scheme.  Every quantized Linear X stores `X.weight` float8_e4m3fn
[out, in] and `X.weight_scale` float32 [out, 1], W = code * scale row by row; activations are
quantized per token at run time (nothing stored).  Quantized: the attention projections, the dense
MLP and the experts of every layer, the experts unfused into per-expert Linears
`layers.{i}.experts.{e}.{gate,up,down}_proj` as vLLM's loader and transformers expect.  Kept bf16
(`IGNORE`): the embedding (also the tied head), router, norms, scalars, the self-conditioning MLP
and the vision tower.

The reader takes these files and re-stacks the per-expert tensors (gate rows first) into the
canonical fused names without copying until a backend loads them; files whose experts are already
stored fused (`experts.gate_up_proj.weight` [E, 2I, H] + `.weight_scale` [E, 2I, 1], as earlier
versions of this converter wrote) read as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from portable_dg.checkpoint import (FLOAT_DTYPES, TensorRef, bf16_to_f32, check_tensors, open_checkpoint,
                                    sanitize)
from portable_dg.config import DiffusionGemmaConfig, read_json
from portable_dg.errors import CheckpointError, ConfigError, FormatError
from portable_dg.outputs import check_new_directory, output_directory
from portable_dg.progress import Progress
from portable_dg.safetensors_writer import (MAX_SHARD_BYTES, Entry, f32_to_bf16_bits, split_shards,
                                            write_index, write_safetensors)

E4M3_MAX = 448.0
QTYPE = "fp8_e4m3"

# Canonical names whose weights are quantized; everything else stays bf16.
QUANTIZED = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj\.weight|mlp\.(gate|up|down)_proj\.weight"
                       r"|experts\.(gate_up|down)_proj)$")
VISION = re.compile(r"^model\.encoder\.(vision_tower|embed_vision)\.")
PER_EXPERT = re.compile(r"^(?P<layer>.*\.layers\.\d+)\.experts\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj$")


def e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn codes (bias 7, no infinities, 0x7F/0xFF NaN)."""
    code = np.arange(256, dtype=np.int32)
    exponent, mantissa = (code >> 3) & 0xF, (code & 7).astype(np.float64)
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude[(code & 0x7F) == 0x7F] = np.nan
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.float32)


E4M3_VALUES = e4m3_values()


@dataclass
class FP8Tensor:
    """A float8_e4m3fn weight with one scale per output row (source.py's quantized-tensor contract).

    `pieces` are (codes [..., in] F8_E4M3, scale [..., 1] / [1] / []) stored tensors whose rows,
    stacked in order, fill the logical `shape` [..., out, in] row-major (several pieces when
    per-expert tensors are re-stacked).  Nothing is read until `codes()` / `scales()`."""

    shape: tuple[int, ...]
    pieces: list[tuple[TensorRef, TensorRef]]
    qtype: str = QTYPE

    def piece_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(codes uint8 [rows, in] memory-mapped, scales float32 [rows, 1]) for each piece."""
        for codes, scale in self.pieces:
            raw = codes.raw().reshape(-1, codes.shape[-1])                 # [rows, in]
            yield raw, np.broadcast_to(scale.load().astype(np.float32).reshape(-1, 1), (raw.shape[0], 1))

    def codes(self) -> np.ndarray:
        """All codes as uint8 [..., out, in] (a copy only when there are several pieces)."""
        arrays = [c for c, _ in self.piece_arrays()]
        return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)).reshape(self.shape)

    def scales(self) -> np.ndarray:
        """Row scales float32 [..., out, 1]."""
        return np.concatenate([s for _, s in self.piece_arrays()]).reshape(*self.shape[:-1], 1)

    def dequantize(self) -> np.ndarray:
        """code * scale as float32 [..., out, in]."""
        return E4M3_VALUES[self.codes()] * self.scales()


# --- reading ------------------------------------------------------------------------------------

def check_fp8_recipe(qc: Mapping[str, Any], source: str) -> None:
    """Accept only FP8 weights with per-channel or per-tensor scales (what `FP8Tensor` decodes)."""
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise FormatError(f"{source}: compressed-tensors format {fmt!r} is not supported; "
                          "expected 'float-quantized' (FP8 e4m3 weights)")
    for name, group in (qc.get("config_groups") or {}).items():
        w = (group or {}).get("weights") or {}
        if (w.get("num_bits"), w.get("type")) != (8, "float") or w.get("strategy") not in ("channel", "tensor"):
            raise FormatError(f"{source}: quantization_config.config_groups.{name}.weights = "
                              f"{json.dumps(w, sort_keys=True)}; expected num_bits 8, type 'float', "
                              "strategy 'channel' or 'tensor'")


def pair_quantized(refs: Mapping[str, TensorRef], source: str) -> dict[str, Any]:
    """Stored name -> TensorRef or FP8Tensor: `X.weight` + `X.weight_scale` become one FP8Tensor."""
    out: dict[str, Any] = {}
    for name, ref in refs.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue   # read with their weight; input scales are for static activations (we quantize per token)
        scale = refs.get(name[:-len("weight")] + "weight_scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = ref
            continue
        if ref.dtype != "F8_E4M3" or len(ref.shape) not in (2, 3):
            raise CheckpointError(f"{source}: quantized tensor {name} is {ref.dtype} {list(ref.shape)}; "
                                  "expected F8_E4M3 [out, in] (or [E, out, in] for stacked experts)")
        per_row = (*ref.shape[:-1], 1)
        if scale.dtype not in FLOAT_DTYPES or tuple(scale.shape) not in (per_row, (1,), ()):
            raise CheckpointError(f"{source}: {scale.name} is {scale.dtype} {list(scale.shape)}; expected a "
                                  f"float {list(per_row)} (per channel) or [1] (per tensor) scale")
        out[name] = FP8Tensor(tuple(ref.shape), [(ref, scale)])
    return out


def restack_experts(tensors: dict[str, Any], cfg: DiffusionGemmaConfig, source: str) -> dict[str, Any]:
    """Replace per-expert `experts.{e}.{gate,up,down}_proj.weight` by the fused stacked tensors
    `experts.gate_up_proj` [E, 2I, H] (expert e = gate_e rows then up_e rows) and `experts.down_proj`
    [E, H, I]."""
    E, H, M = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    layers: dict[str, dict[tuple[str, int], Any]] = defaultdict(dict)
    out = {}
    for name, value in tensors.items():
        m = PER_EXPERT.match(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if m is None:
            out[name] = value
        else:
            layers[m["layer"]][m["proj"], int(m["e"])] = value
    for layer, parts in layers.items():
        for key in [(p, e) for e in range(E) for p in ("gate", "up", "down")]:
            value = parts.get(key)
            if not isinstance(value, FP8Tensor):
                kind = "missing" if value is None else "not FP8 (only quantized per-expert tensors are re-stacked)"
                raise CheckpointError(f"{source}: {layer}.experts.{key[1]}.{key[0]}_proj.weight is {kind}")
        gate_up = [p for e in range(E) for proj in ("gate", "up") for p in parts[proj, e].pieces]
        out[layer + ".experts.gate_up_proj"] = FP8Tensor((E, 2 * M, H), gate_up)
        out[layer + ".experts.down_proj"] = FP8Tensor((E, H, M), [p for e in range(E) for p in parts["down", e].pieces])
    return out


def read_compressed_tensors(path: Path):
    """A compressed-tensors FP8 directory (ours, or RedHatAI FP8-dynamic) -> ModelSource."""
    from portable_dg.source import LazyTensors, ModelSource, read_configs
    from portable_dg.tokenizer import Tokenizer

    raw = read_json(path / "config.json")
    check_fp8_recipe(raw["quantization_config"], str(path / "config.json"))
    _, config, generation = read_configs(path)
    tensors = sanitize(restack_experts(pair_quantized(open_checkpoint(path), str(path)), config, str(path)))
    check_tensors(tensors, config, str(path), quantized_as="weight_scale")
    metadata = {"synthetic": bool(raw.get("portable_dg_synthetic", False)),
                "quantization": raw["quantization_config"],
                "dtypes": sorted({QTYPE if isinstance(v, FP8Tensor) else v.dtype for v in tensors.values()})}
    return ModelSource(config, generation, LazyTensors(tensors), Tokenizer.from_directory(path),
                       "fp8", path, metadata)


# --- converting ---------------------------------------------------------------------------------

@dataclass
class Planned:
    """One output tensor: stored name, safetensors dtype, shape, and where its values come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorRef
    rows: slice            # rows of the source viewed as [rows, in] (an expert's gate, up or down)
    part: str              # "codes", "scale" or "bf16"

    @property
    def entry(self) -> Entry:
        return Entry(self.name, self.dtype, tuple(self.shape))


def output_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], slice]]:
    """(stored name without `.weight`, shape, source rows) of each Linear a canonical weight
    becomes: itself, or per expert `experts.{e}.gate_proj` / `up_proj` / `down_proj` (RedHatAI's
    and vLLM's layout; the fused gate_up_proj holds expert e's gate rows, then its up rows)."""
    if name.endswith(".experts.gate_up_proj"):
        E, two_i, H = shape
        i = two_i // 2
        base = name.removesuffix("gate_up_proj")
        return [(f"{base}{e}.{proj}_proj", (i, H), slice(e * two_i + k * i, e * two_i + (k + 1) * i))
                for e in range(E) for k, proj in enumerate(("gate", "up"))]
    if name.endswith(".experts.down_proj"):
        E, H, i = shape
        base = name.removesuffix("down_proj")
        return [(f"{base}{e}.down_proj", (H, i), slice(e * H, (e + 1) * H)) for e in range(E)]
    return [(name.removesuffix(".weight"), shape, slice(None))]


def plan_tensors(refs: Mapping[str, TensorRef]) -> list[Planned]:
    """The output tensors for stored tensors `refs` (canonical text tensors and the vision tower),
    sorted by stored name: FP8 codes and a float32 scale per output row for every `QUANTIZED`
    weight, bf16 for everything else."""
    plan = []
    for name, ref in refs.items():
        shape = tuple(ref.shape)
        if not QUANTIZED.search(name):
            plan.append(Planned(name, "BF16", shape, ref, slice(None), "bf16"))
            continue
        for module, out_shape, rows in output_names(name, shape):
            plan.append(Planned(module + ".weight", "F8_E4M3", out_shape, ref, rows, "codes"))
            plan.append(Planned(module + ".weight_scale", "F32", (*out_shape[:-1], 1), ref, rows, "scale"))
    return sorted(plan, key=lambda p: p.name)


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float weights [..., out, in] -> (e4m3 codes uint8 [..., out, in], float32 scales [..., out, 1]).

    scale = amax(|row|) / 448 (1 for an all-zero row); codes round to nearest even, saturating."""
    import torch

    t = torch.from_numpy(np.array(w, dtype=np.float32))                  # a writable copy of the map
    amax = t.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8).numpy(), scale.numpy()


def source_revision(src: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot directory, else None."""
    return src.name if src.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", src.name) else None


# Linears kept in bf16, as compressed-tensors `ignore` patterns (matched with re.match against
# module names, ours and vLLM's alike): the tied head, the router (vLLM runs it in bf16 with a
# float32 output), the self-conditioning MLP, the vision tower and its projection.
IGNORE = ["lm_head", "re:.*router\\.proj$", "re:.*self_conditioning\\..*", "re:.*vision_tower.*",
          "re:.*embed_vision.*"]


def quantization_config() -> dict[str, Any]:
    """config.json's quantization_config: the compressed-tensors FP8-dynamic scheme as llm-compressor
    writes it and vLLM's CompressedTensorsConfig reads it (one group targeting every Linear, which
    vLLM extends to the MoE experts; per-channel static e4m3 weights; per-token dynamic activations)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
               "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                   "block_structure": None, "dynamic": True, "actorder": None, "observer": None,
                   "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": "float-quantized"}},
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def conversion_record(src: Path) -> dict[str, Any]:
    """What config.json records of the conversion (beside the quantization config)."""
    return {"format": "fp8", "recipe": "fp8-e4m3 weights, per-output-channel float32 scale = amax/448, round to "
                                       "nearest even, saturating; activations quantized per token at run time; "
                                       "embedding, router, norms, scalars, self-conditioning and vision kept bf16",
            "source": str(src), "source_revision": source_revision(src)}


def check_source(src: Path) -> dict[str, Any]:
    """SRC's config.json, if SRC is an unquantized Hugging Face directory."""
    if not (src / "config.json").exists():
        raise ConfigError(f"{src}: not a Hugging Face model directory (no config.json)")
    raw = read_json(src / "config.json")
    if "quantization_config" in raw or "quantization" in raw:
        raise ConfigError(f"{src}: already quantized (config.json has a quantization block); "
                          "convert from the bf16 checkpoint")
    return raw


def encode(plan: list[Planned]) -> Iterator[np.ndarray]:
    """Each planned tensor's stored elements; a quantized weight is read and quantized once (its
    codes and scale are neighbours in the sorted plan)."""
    cache: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]] = {}
    for p in plan:
        if p.part == "bf16":
            raw = p.source.raw()
            yield raw if p.source.dtype == "BF16" else f32_to_bf16_bits(p.source.load())
            continue
        key = (p.source.name, p.rows.start)
        if key not in cache:
            cache.clear()
            rows = p.source.raw().reshape(-1, p.source.shape[-1])[p.rows]           # [rows, in], mapped
            cache[key] = quantize_rows(bf16_to_f32(rows) if p.source.dtype == "BF16" else rows)
        yield cache[key][0 if p.part == "codes" else 1]


def convert_fp8(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = True) -> Path:
    """Quantize a Hugging Face DiffusionGemma checkpoint to FP8 in the compressed-tensors layout
    RedHatAI publishes and vLLM serves (per-expert Linears); returns DST.

    Writes into a temporary directory next to DST and renames it at the end, so DST is either
    complete or absent."""
    from portable_dg.source import resolved_generation_config

    src = Path(src)
    raw = check_source(src)
    dst = check_new_directory(dst, sources=[src])
    config = DiffusionGemmaConfig.from_file(src / "config.json")
    stored = open_checkpoint(src)
    refs = sanitize(stored)
    check_tensors(refs, config, str(src))
    vision = {n: r for n, r in stored.items() if VISION.match(n) and r.dtype in FLOAT_DTYPES}
    plan = plan_tensors({**refs, **vision})
    shards = split_shards(plan, lambda p: p.entry.nbytes, MAX_SHARD_BYTES)
    files = [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    with output_directory(dst, sources=[src]) as tmp, \
            Progress(sum(p.entry.nbytes for p in plan), f"convert {dst.name} (fp8)", enabled=progress) as bar:
        for file, tensors in zip(files, shards):
            write_safetensors(tmp / file, [p.entry for p in tensors], counted(encode(tensors), bar))
        write_index(tmp, [(f, [p.entry for p in g]) for f, g in zip(files, shards)])
        copy_side_files(src, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(resolved_generation_config(src), indent=2) + "\n")
        raw["quantization_config"] = quantization_config()
        raw["portable_dg_conversion"] = conversion_record(src)
        if not vision:
            raw["vision_config"] = None
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return dst


def counted(items: Iterator[np.ndarray], bar: Progress) -> Iterator[np.ndarray]:
    """Pass items through, counting their bytes on the progress bar."""
    for item in items:
        yield item
        bar.update(item.nbytes)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, processor files: everything but weights, index and the configs."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                "config.json", "model.safetensors.index.json", "generation_config.json"):
            shutil.copy2(f, dst / f.name)


def convert_to_torch(src: str, out: str, quant: str, *, imatrix: str | None = None,
                     progress: bool = True) -> Path:
    """`pdg convert SRC OUT --to torch --quant fp8` (the `pdg convert` table's signature)."""
    from portable_dg.checkpoint import resolve_model_path

    if quant.upper() != "FP8":
        raise ConfigError(f"--to torch writes FP8 only: use --quant fp8 (got {quant!r}); the torch "
                          "backend reads bf16 Hugging Face checkpoints as they are")
    if imatrix is not None:
        raise ConfigError("--imatrix does not apply to --to torch (FP8 scales are per-channel amax)")
    return convert_fp8(resolve_model_path(src), out, progress=progress)
