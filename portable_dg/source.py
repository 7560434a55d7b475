"""Model sources: what a checkpoint on disk provides, whatever its format.

A reader turns a path into a `ModelSource`: the config, the generation defaults, a tokenizer, and
tensors under their canonical names (see `portable_dg.checkpoint.sanitize`).  A tensor value is
either a numpy float array (possibly memory-mapped) or a quantized tensor object with `shape` (the
logical, unquantized shape), `qtype` (a short name such as "Q4_K" or "affine4g64") and
`dequantize() -> np.ndarray float32`; a backend keeps the quantized form when it can and
dequantizes otherwise.

Readers: Hugging Face directories here; GGUF files and MLX directories in `portable_dg.converters`.
"""

from __future__ import annotations

import importlib
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .checkpoint import check_tensors, open_checkpoint, resolve_model_path, sanitize
from .config import DiffusionGemmaConfig, GenerationConfig, read_json
from .errors import CheckpointError
from .tokenizer import Tokenizer


@dataclass
class ModelSource:
    """Everything needed to build a model, independent of the file format."""

    config: DiffusionGemmaConfig
    generation: GenerationConfig
    tensors: Mapping[str, Any]                  # canonical name -> array or quantized tensor
    tokenizer: Tokenizer | None
    format: str                                 # "hf", "mlx", "gguf", ...
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)  # quantization, synthetic, ...


def read_configs(path: Path) -> tuple[dict[str, Any], DiffusionGemmaConfig, GenerationConfig]:
    """(raw config.json, model config, generation config) of a checkpoint directory."""
    raw = read_json(path / "config.json")
    config = DiffusionGemmaConfig.from_dict(raw, source=str(path / "config.json"))
    gen_path = path / "generation_config.json"
    generation = GenerationConfig.from_dict(read_json(gen_path) if gen_path.exists() else {}, config,
                                            source=str(gen_path))
    return raw, config, generation


def resolved_generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint directory with every setting resolved: transformers
    saves unset fields as null (which other tools, mlx-vlm among them, fail on); here they hold
    the values the sampler uses.  Keys we do not use are kept unless null."""
    gen_path = path / "generation_config.json"
    raw = read_json(gen_path) if gen_path.exists() else {}
    resolved = read_configs(path)[2].to_dict()
    sampler = raw.get("sampler_config")
    if isinstance(sampler, dict):
        resolved["sampler_config"] = {**{k: v for k, v in sampler.items() if v is not None},
                                      **resolved["sampler_config"]}
    return {**{k: v for k, v in raw.items() if v is not None}, **resolved}


def read_hf(path: Path) -> ModelSource:
    """A Hugging Face checkpoint directory (single or sharded safetensors)."""
    raw, config, generation = read_configs(path)
    tensors = sanitize(open_checkpoint(path))
    check_tensors(tensors, config, str(path))
    metadata = {"synthetic": bool(raw.get("portable_dg_synthetic", False)),
                "dtypes": sorted({ref.dtype for ref in tensors.values()})}
    return ModelSource(config, generation, LazyTensors(tensors), Tokenizer.from_directory(path),
                       "hf", path, metadata)


class LazyTensors(abc.Mapping):
    """name -> tensor, read on lookup: values with a `load()` (memory-mapped TensorRefs, a
    format's quantized references) are loaded then; others are returned as they are."""

    def __init__(self, refs: Mapping[str, Any]):
        self.refs = refs

    def __getitem__(self, name: str) -> Any:
        value = self.refs[name]
        return value.load() if hasattr(value, "load") else value

    def stored(self, name: str) -> Any:
        """The tensor as stored: like [name], but bfloat16 comes as a BF16Tensor (see checkpoint)."""
        value = self.refs[name]
        return value.stored() if hasattr(value, "stored") else self[name]

    def __iter__(self):
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


# Readers by format name: (predicate on the resolved path, "module:function").
READERS: dict[str, tuple[Callable[[Path], bool], str]] = {
    "gguf": (lambda p: p.is_file() and p.suffix == ".gguf", "portable_dg.converters.gguf:read_gguf"),
    "mlx": (lambda p: p.is_dir() and "quantization" in read_json(p / "config.json")
            if (p / "config.json").exists() else False, "portable_dg.converters.mlx:read_mlx"),
    "fp8": (lambda p: p.is_dir() and (p / "config.json").exists() and (read_json(p / "config.json").get(
        "quantization_config") or {}).get("quant_method") == "compressed-tensors",
        "portable_dg.converters.torch_fp8:read_compressed_tensors"),
    "hf": (lambda p: p.is_dir() and (p / "config.json").exists(), "portable_dg.source:read_hf"),
}


def open_source(path_or_repo_id: str | Path) -> ModelSource:
    """Detect the format of a local path or hub repo id and read it."""
    path = resolve_model_path(path_or_repo_id)
    for name, (matches, target) in READERS.items():
        if matches(path):
            module, func = target.split(":")
            return getattr(importlib.import_module(module), func)(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    raise CheckpointError(f"{path}: unrecognised model file (expected a .gguf file or a directory)")
