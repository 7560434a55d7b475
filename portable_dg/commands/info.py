"""`pdg info`: what a checkpoint is, without running it."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import click
import numpy as np

from ..config import FULL
from ..progress import format_bytes


def human(n: float) -> str:
    """A count: 1234567 -> '1.23 M'."""
    for unit in ("", " K", " M", " B", " T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g} P"


def tensor_types(tensors) -> Counter:
    """Histogram of storage types (a quantized tensor's qtype, else the stored or numpy dtype),
    read without loading anything when the tensors are lazy."""
    types: Counter = Counter()
    refs = getattr(tensors, "refs", None)
    for name in tensors:
        value = refs[name] if refs is not None else tensors[name]
        types[getattr(value, "qtype", None) or str(getattr(value, "dtype", "?"))] += 1
    return types


def vision_summary(source) -> dict[str, Any] | None:
    """The image side: the vision tower's geometry from the config and whether the checkpoint
    carries its weights (a GGUF file gets them from an mmproj file, `pdg generate --mmproj`)."""
    from ..checkpoint import VISION_PROJECTION, VISION_STORED

    vision = source.config.vision
    if vision is None:
        return None
    names = [n for n in source.tensors if VISION_STORED.match(n)]
    refs = getattr(source.tensors, "refs", source.tensors)
    return {"layers": vision.num_hidden_layers, "hidden_size": vision.hidden_size,
            "patch_size": vision.patch_size, "pooling_kernel_size": vision.pooling_kernel_size,
            "weights": VISION_PROJECTION in source.tensors,
            "parameters": int(sum(int(np.prod(refs[n].shape)) for n in names))}


def describe(source) -> dict[str, Any]:
    """A JSON-able description of a ModelSource."""
    cfg, gen = source.config, source.generation
    total, active = cfg.parameter_counts()
    n_full = sum(g.kind == FULL for g in cfg.layers)
    info = {
        "path": str(source.path),
        "format": source.format,
        "architecture": "DiffusionGemma (block-diffusion MoE)",
        "synthetic": bool(source.metadata.get("synthetic", False)),
        "parameters": {"total": total, "active_per_token": active},
        "layers": {"total": cfg.num_hidden_layers, "sliding": cfg.num_hidden_layers - n_full,
                   "full": n_full, "sliding_window": cfg.sliding_window},
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "experts": {"count": cfg.num_experts, "top_k": cfg.top_k_experts,
                    "width": cfg.moe_intermediate_size},
        "canvas_length": cfg.canvas_length,
        "tensor_types": dict(tensor_types(source.tensors)),   # of the canonical tensors; a GGUF file's own below
        "quantization": source.metadata.get("quantization"),
        "tokenizer": None if source.tokenizer is None else {
            "kind": source.tokenizer.kind, "vocab_size": source.tokenizer.vocab_size,
            "chat_template": bool(source.tokenizer.chat_template)},
        "generation": gen.to_dict(),
        "vision": vision_summary(source),
    }
    if source.format == "gguf":
        from ..converters.gguf import describe_gguf
        gguf = describe_gguf(source.path)
        info["file"] = {k: gguf[k] for k in ("file_size", "bits_per_weight", "types")}
    return info


@click.command()
@click.argument("model_path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model_path, as_json):
    """Describe a checkpoint: architecture, parameters, storage, tokenizer, sampler defaults."""
    from ..source import open_source

    source = open_source(model_path)
    data = describe(source)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    p = data["parameters"]
    click.echo(f"{data['path']}  [{data['format']}{', SYNTHETIC random weights' if data['synthetic'] else ''}]")
    click.echo(f"  architecture   {data['architecture']}")
    click.echo(f"  parameters     {human(p['total'])} total, {human(p['active_per_token'])} active per token")
    lay = data["layers"]
    click.echo(f"  layers         {lay['total']} ({lay['sliding']} sliding, window {lay['sliding_window']}; "
               f"{lay['full']} full)  hidden {data['hidden_size']}  vocab {data['vocab_size']}")
    ex = data["experts"]
    click.echo(f"  experts        {ex['count']} x width {ex['width']}, top-{ex['top_k']}")
    click.echo(f"  canvas         {data['canvas_length']} tokens")
    if "file" in data:       # a GGUF file: the types of the tensors it stores (rope_freqs included)
        f = data["file"]
        click.echo("  tensors        " + ", ".join(f"{k}: {v['tensors']}" for k, v in f["types"].items()))
        click.echo(f"  file           {format_bytes(f['file_size'])}, {f['bits_per_weight']:.2f} bits per weight")
    else:
        click.echo("  tensors        " + ", ".join(f"{k}: {v}" for k, v in sorted(data["tensor_types"].items())))
    if data["quantization"]:
        click.echo(f"  quantization   {quantization_summary(data['quantization'])}")
    tok = data["tokenizer"]
    click.echo("  tokenizer      " + ("none" if tok is None else
               f"{tok['kind']}, {tok['vocab_size']} tokens, chat template: {'yes' if tok['chat_template'] else 'no'}"))
    vis = data["vision"]
    if vis is not None:
        weights = (f"{human(vis['parameters'])} parameters" if vis["weights"] else
                   "no weights in this file (give an mmproj file: pdg generate --mmproj)")
        click.echo(f"  vision         {vis['layers']} layers, hidden {vis['hidden_size']}, patch {vis['patch_size']}, "
                   f"pooling {vis['pooling_kernel_size']}x{vis['pooling_kernel_size']}; {weights}")
    click.echo("  generation     " + ", ".join(f"{k}={v}" for k, v in data["generation"].items()))


def quantization_summary(q: dict[str, Any]) -> str:
    """One line for a quantization block: compressed-tensors' scheme in words, MLX's as JSON."""
    if q.get("quant_method") != "compressed-tensors":
        return json.dumps(q)
    parts = []
    for group in (q.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        text = f"weights {w.get('num_bits')}-bit {w.get('type')} per {w.get('strategy')}"
        if a:
            text += f", activations per {a.get('strategy')} ({'dynamic' if a.get('dynamic') else 'static'})"
        parts.append(text)
    return f"compressed-tensors {q.get('format')}: " + "; ".join(parts) + f"; kept: {', '.join(q.get('ignore') or [])}"
