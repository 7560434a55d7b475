"""The vision tower as llama.cpp carries it: a separate `mmproj` GGUF file (docs/vision.md §5.1).

`convert_to_mmproj` writes one from a Hugging Face checkpoint with a vision tower, in the layout
llama.cpp's Gemma 4 converter writes (`general.architecture` "clip", projector type "gemma4v",
gguf-py's MMPROJ tensor names, the patch embedding as a [D, 3, p, p] convolution kernel, the
position table F32), plus `clip.use_gelu` = true: the tower's MLP is a tanh GELU, which clip.cpp
runs only with that key (without it, `gelu_quick`).  The checkpoint's image processor section is
kept under `portable_dg.image_processor` (JSON) so the processor can be rebuilt from the file.

`read_mmproj` reads such a file (ours, or llama.cpp's for the same tower) into a `VisionConfig` and
the canonical vision tensors (`portable_dg.checkpoint.vision_tensors`' names) for a text model of a
given width; `attach_mmproj` adds them to a `ModelSource` (a GGUF text model, say).  Whatever
`clip.use_gelu` says, the tower runs transformers' tanh GELU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from portable_dg.checkpoint import (POSITION_TABLE, VISION_PROJECTION, VISION_TOWER, check_vision_tensors,
                                    expected_vision_tensors, open_checkpoint, vision_tensors)
from portable_dg.config import DiffusionGemmaConfig, VisionConfig
from portable_dg.errors import CheckpointError, ConfigError, FormatError

from .gguf import GGUFTensor, PlannedTensor, _stored_tensor, decode_fields, open_gguf, write_gguf
from .gguf_quant import FILE_TYPES, with_fallback

CLIP = "clip"
PROJECTOR = "gemma4v"
MMPROJ_QUANTS = ("F32", "F16", "BF16", "Q8_0")
IMAGE_PROCESSOR_KEY = "portable_dg.image_processor"
LAYER = VISION_TOWER + "encoder.layers.{i}."
# HF suffix after `model.encoder.vision_tower.encoder.layers.{i}.` -> GGUF suffix after `v.blk.{i}.`
LAYER_TENSORS = {
    "self_attn.q_proj.linear.weight": "attn_q.weight",
    "self_attn.k_proj.linear.weight": "attn_k.weight",
    "self_attn.v_proj.linear.weight": "attn_v.weight",
    "self_attn.o_proj.linear.weight": "attn_out.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "ln1.weight",
    "post_attention_layernorm.weight": "attn_post_norm.weight",
    "pre_feedforward_layernorm.weight": "ln2.weight",
    "post_feedforward_layernorm.weight": "ffn_post_norm.weight",
    "mlp.gate_proj.linear.weight": "ffn_gate.weight",
    "mlp.up_proj.linear.weight": "ffn_up.weight",
    "mlp.down_proj.linear.weight": "ffn_down.weight",
}
# clipped linears' bounds (0-d in HF, [1] in GGUF): `self_attn.q_proj.input_min` -> `attn_q.input_min`
CLIPPED = {hf.removesuffix(".linear.weight"): gg.removesuffix(".weight")
           for hf, gg in LAYER_TENSORS.items() if hf.endswith(".linear.weight")}
BOUNDS = ("input_min", "input_max", "output_min", "output_max")
GLOBAL_TENSORS = {
    VISION_TOWER + "patch_embedder.input_proj.weight": "v.patch_embd.weight",     # [D, 3, p, p] kernel
    POSITION_TABLE: "v.position_embd.weight",                                   # [2, P, D], F32
    VISION_TOWER + "std_bias": "v.std_bias",
    VISION_TOWER + "std_scale": "v.std_scale",
    VISION_PROJECTION: "mm.input_projection.weight",
}


def mmproj_names(cfg: DiffusionGemmaConfig) -> dict[str, str]:
    """Canonical vision tensor name -> GGUF name (the position table's .x / .y halves -> one)."""
    names = {}
    for name in expected_vision_tensors(cfg):
        if name.startswith(POSITION_TABLE):
            names[name] = GLOBAL_TENSORS[POSITION_TABLE]
            continue
        if name in GLOBAL_TENSORS:
            names[name] = GLOBAL_TENSORS[name]
            continue
        i, suffix = name[len(VISION_TOWER + "encoder.layers."):].split(".", 1)
        module, _, bound = suffix.rpartition(".")
        names[name] = f"v.blk.{i}." + (f"{CLIPPED[module]}.{bound}" if bound in BOUNDS else LAYER_TENSORS[suffix])
    return names


# --- writing ----------------------------------------------------------------------------------

def convert_to_mmproj(src: str | Path, out: str | Path, quant: str = "F16", *, imatrix: str | None = None,
                      force: bool = False, progress: bool = True) -> Path:
    """Write the vision tower and projector of a Hugging Face checkpoint as an mmproj GGUF file.

    Args:
        src: checkpoint directory (or hub repo id) with a vision tower.
        out: the .gguf file to write (atomically; never the source; an existing file only with
            `force`).
        quant: F32, F16, BF16 or Q8_0 for the matrices (llama.cpp's mmproj types); norms, scales
            and the position table stay F32, the patch kernel F16 (F32 in an F32 file), and a
            matrix whose rows do not fit Q8_0 blocks F16.
        imatrix: not used (the tower is never quantized below 8 bits); giving one is an error.
        progress: report progress on stderr.
    Returns: the output path."""
    from portable_dg.checkpoint import resolve_model_path
    from portable_dg.image_processor import ImageProcessorConfig
    from portable_dg.source import read_hf

    if quant not in MMPROJ_QUANTS:
        raise ConfigError(f"mmproj type {quant!r} is not supported; expected one of {', '.join(MMPROJ_QUANTS)}")
    if imatrix is not None:
        raise ConfigError("--imatrix does not apply to an mmproj file (its matrices stay 8-bit or wider)")
    src = resolve_model_path(src)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    source = read_hf(src)
    cfg = source.config
    refs = vision_tensors(open_checkpoint(src))
    if not check_vision_tensors(refs, cfg, str(src)):
        raise ConfigError(f"{src}: the checkpoint has no vision tower (no vision_config or no vision tensors)")
    image = ImageProcessorConfig.from_directory(src) or ImageProcessorConfig(
        patch_size=cfg.vision.patch_size, pooling_kernel_size=cfg.vision.pooling_kernel_size)
    planned = planned_tensors(refs, cfg, quant)
    return write_gguf(out, CLIP, mmproj_metadata(cfg, image, src.name, quant), planned, sources=[src],
                      force=force, progress=progress)


def mmproj_metadata(cfg: DiffusionGemmaConfig, image: Any, name: str, quant: str) -> dict[str, tuple[str, Any]]:
    """The clip keys of llama.cpp's Gemma 4 mmproj files, `clip.use_gelu`, and our image processor."""
    import dataclasses

    v = cfg.vision
    return {
        "general.type": ("STRING", "mmproj"),
        "general.name": ("STRING", name),
        "general.file_type": ("UINT32", FILE_TYPES[quant]),
        "clip.has_vision_encoder": ("BOOL", True),
        "clip.projector_type": ("STRING", PROJECTOR),
        "clip.vision.projector_type": ("STRING", PROJECTOR),
        "clip.vision.projection_dim": ("UINT32", cfg.hidden_size),
        "clip.vision.image_size": ("UINT32", 224),                # unused by gemma4v; llama.cpp writes it
        "clip.vision.patch_size": ("UINT32", v.patch_size),
        "clip.vision.embedding_length": ("UINT32", v.hidden_size),
        "clip.vision.feed_forward_length": ("UINT32", v.intermediate_size),
        "clip.vision.block_count": ("UINT32", v.num_hidden_layers),
        "clip.vision.attention.head_count": ("UINT32", v.num_attention_heads),
        "clip.vision.attention.layer_norm_epsilon": ("FLOAT32", v.rms_norm_eps),
        "clip.vision.image_mean": ("ARRAY:FLOAT32", [float(x) for x in image.image_mean]),
        "clip.vision.image_std": ("ARRAY:FLOAT32", [float(x) for x in image.image_std]),
        "clip.vision.projector.scale_factor": ("UINT32", v.pooling_kernel_size),
        "clip.use_gelu": ("BOOL", True),
        IMAGE_PROCESSOR_KEY: ("STRING", json.dumps(dataclasses.asdict(image))),
    }


def planned_tensors(refs: Mapping[str, Any], cfg: DiffusionGemmaConfig, quant: str) -> list[PlannedTensor]:
    """Every mmproj tensor in file order (globals, then each block's), with its type and rows."""
    v = cfg.vision
    names = mmproj_names(cfg)
    planned = []
    for name, gname in names.items():
        if name == POSITION_TABLE + ".y":
            continue
        if name == POSITION_TABLE + ".x":          # [2, P, D]: the x table, then the y table
            values = np.stack([refs[POSITION_TABLE + ".x"].load(), refs[POSITION_TABLE + ".y"].load()])
            planned.append(array_tensor(gname, values.astype(np.float32), "F32"))
        elif gname == "v.patch_embd.weight":       # [D, 3p^2] (row, column, channel) -> [D, 3, p, p]
            p = v.patch_size
            kernel = refs[name].load().reshape(v.hidden_size, p, p, 3).transpose(0, 3, 1, 2)
            planned.append(array_tensor(gname, np.ascontiguousarray(kernel, np.float32),
                                        "F32" if quant == "F32" else "F16"))
        else:
            values = np.asarray(refs[name].load(), np.float32)
            values = values.reshape(1) if values.ndim == 0 else values
            qtype = "F32" if values.ndim == 1 else with_fallback(quant, values.shape[-1])
            planned.append(array_tensor(gname, values, qtype))
    return planned


def array_tensor(name: str, values: np.ndarray, qtype: str) -> PlannedTensor:
    """A PlannedTensor over an array (its rows: the array as [prod(shape[:-1]), shape[-1]])."""
    flat = values.reshape(-1, values.shape[-1])
    return PlannedTensor(name, tuple(values.shape), qtype, lambda a, b: flat[a:b])


# --- reading ----------------------------------------------------------------------------------

def read_mmproj(path: str | Path, text: DiffusionGemmaConfig) -> tuple[VisionConfig, dict[str, Any], dict[str, Any]]:
    """(vision config, canonical vision tensors, image processor settings or {}) of a gemma4v mmproj
    file for a text model of config `text`.  Raises FormatError naming the file on another kind of
    projector, a width that does not match the text model, or missing or misshaped tensors."""
    path = Path(path)
    file = open_gguf(path)
    fields = decode_fields(file)
    arch = fields.get("general.architecture")
    projector = fields.get("clip.vision.projector_type", fields.get("clip.projector_type"))
    if arch != CLIP or projector != PROJECTOR:
        raise FormatError(f"{path}: not a Gemma 4 vision projector (general.architecture {arch!r}, "
                          f"projector type {projector!r}; expected 'clip' and {PROJECTOR!r})")
    if fields.get("clip.vision.projection_dim") != text.hidden_size:
        raise FormatError(f"{path}: the projector maps to width {fields.get('clip.vision.projection_dim')}, "
                          f"the text model is {text.hidden_size} wide (an mmproj of another model?)")
    stored = {t.name: _stored_tensor(file, t) for t in file.tensors}
    vision = vision_config(fields, stored, path)
    cfg = with_vision(text, vision)
    tensors = {}
    for name, gname in mmproj_names(cfg).items():
        if gname not in stored:
            raise FormatError(f"{path}: missing tensor {gname} (for {name})")
        tensors[name] = canonical_value(name, stored[gname], vision, path)
    check_vision_tensors(tensors, cfg, str(path))
    processor = fields.get(IMAGE_PROCESSOR_KEY)
    return vision, tensors, json.loads(processor) if isinstance(processor, str) else {}


def vision_config(fields: Mapping[str, Any], stored: Mapping[str, GGUFTensor], path: Path) -> VisionConfig:
    """The VisionConfig the clip keys and tensor shapes describe (head size and key/value heads from
    the q and k projections, the position table's size from its shape)."""
    def number(key: str, default: Any = None) -> Any:
        value = fields.get(key, default)
        if value is None:
            raise FormatError(f"{path}: missing metadata key {key}")
        return value
    heads = number("clip.vision.attention.head_count")
    q, k, table = (stored.get(n) for n in ("v.blk.0.attn_q.weight", "v.blk.0.attn_k.weight",
                                           "v.position_embd.weight"))
    if q is None or k is None or table is None or len(table.shape) != 3:
        raise FormatError(f"{path}: missing or misshaped v.blk.0.attn_q/attn_k or v.position_embd tensors")
    head_dim = q.shape[0] // heads
    try:
        return VisionConfig(
            hidden_size=number("clip.vision.embedding_length"),
            intermediate_size=number("clip.vision.feed_forward_length"),
            num_hidden_layers=number("clip.vision.block_count"), num_attention_heads=heads,
            num_key_value_heads=k.shape[0] // head_dim, head_dim=head_dim, patch_size=number("clip.vision.patch_size"),
            pooling_kernel_size=number("clip.vision.projector.scale_factor", 3), position_embedding_size=table.shape[1],
            rms_norm_eps=number("clip.vision.attention.layer_norm_epsilon", 1e-6),
            standardize="v.std_bias" in stored, use_clipped_linears="v.blk.0.attn_q.input_min" in stored)
    except ConfigError as e:
        raise FormatError(f"{path}: inconsistent vision metadata: {e}") from None


def with_vision(text: DiffusionGemmaConfig, vision: VisionConfig) -> DiffusionGemmaConfig:
    """A copy of a text config with a vision tower."""
    import dataclasses

    return dataclasses.replace(text, vision=vision)


def canonical_value(name: str, t: GGUFTensor, vision: VisionConfig, path: Path) -> Any:
    """A stored mmproj tensor in its canonical form: the patch kernel back to [D, 3p^2], the position
    table's x or y half, bounds back to 0-d; F32/F16 as arrays, other types as GGUFTensors."""
    if t.name == "v.patch_embd.weight":
        p, D = vision.patch_size, vision.hidden_size
        if t.shape != (D, 3, p, p):
            raise FormatError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected {[D, 3, p, p]}")
        return t.dequantize().transpose(0, 2, 3, 1).reshape(D, 3 * p * p)         # [D, p, p, 3] rows
    if name.startswith(POSITION_TABLE):
        return t.dequantize()[0 if name.endswith(".x") else 1]
    if name.rpartition(".")[2] in BOUNDS:
        return t.dequantize().reshape(())
    if t.qtype in ("F32", "F16"):
        return t.data.view(np.float32 if t.qtype == "F32" else np.float16).reshape(t.shape)
    return t


def attach_mmproj(source: Any, path: str | Path) -> Any:
    """`source` (a ModelSource) with the vision tower of an mmproj file: its config gains the
    vision config (and the image token id its tokenizer gives `<|image|>`), its tensors the
    vision tensors, its metadata the file and the image processor settings."""
    from portable_dg.source import LazyTensors

    vision, tensors, processor = read_mmproj(path, source.config)
    source.config = with_vision(source.config, vision)
    image_id = source.tokenizer.token_to_id("<|image|>") if source.tokenizer is not None else None
    if image_id is not None:
        source.config.image_token_id = image_id
    refs = source.tensors.refs if isinstance(source.tensors, LazyTensors) else source.tensors
    source.tensors = LazyTensors({**refs, **tensors})
    source.metadata = {**source.metadata, "mmproj": str(path), "image_processor": processor}
    return source
