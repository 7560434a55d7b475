"""`pdg convert`: write a checkpoint in another format (GGUF file, MLX directory, FP8 directory).

Progress goes to stderr (a bar on a terminal, plain lines in a log); the output appears only when
complete."""

from __future__ import annotations

import importlib

import click

from ..errors import ConfigError

# target format -> "module:function(src, out, quant, *, imatrix, ...)"
CONVERTERS = {
    "gguf": "portable_dg.converters.gguf:convert_to_gguf",
    "mmproj": "portable_dg.converters.gguf_mmproj:convert_to_mmproj",     # the vision tower, llama.cpp's layout
    "mlx": "portable_dg.converters.mlx:convert_to_mlx",
    "torch": "portable_dg.converters.torch_fp8:convert_to_torch",
}


@click.command()
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=True))
@click.option("--to", "target", required=True, type=click.Choice(sorted(CONVERTERS)), help="Output format.")
@click.option("--quant", default="F16", show_default=True,
              help="GGUF: F32, F16, BF16, Q8_0, Q4_0, Q3_K, Q4_K, Q5_K, Q6_K, Q4_K_M or Q5_K_M. "
                   "mmproj: F32, F16, BF16 or Q8_0. MLX: none, bf16, f16, q4, q6, q8 or mxfp4. torch: fp8.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Importance matrix (.npz from `pdg imatrix`) for the quantized types.")
@click.option("--group-size", type=int, default=None,
              help="MLX: group size of the default quantization (affine 32/64/128, mxfp4 32).")
@click.option("--mix", type=click.Choice(["portable", "mlx-vlm"]), default=None,
              help="MLX: 'portable' (default) keeps the router projection and self-conditioning MLP "
                   "in float; 'mlx-vlm' quantizes them as the mlx-community files do.")
@click.option("--force", is_flag=True, help="GGUF: replace OUT if it exists (MLX and torch outputs are "
                                            "directories, which are never replaced).")
@click.option("--threads", type=int, default=None,
              help="GGUF: rows quantized at once.  [default: every usable core]")
def convert(src: str, out: str, target: str, quant: str, imatrix: str | None, group_size: int | None,
            mix: str | None, force: bool, threads: int | None) -> None:
    """Convert the checkpoint SRC (directory or hub repo id) to OUT."""
    if (group_size is not None or mix is not None) and target != "mlx":
        raise ConfigError("--group-size and --mix apply to --to mlx only")
    if threads is not None and (target != "gguf" or threads < 1):
        raise ConfigError("--threads applies to --to gguf only" if target != "gguf" else
                          f"--threads must be at least 1, got {threads}")
    if force and target not in ("gguf", "mmproj"):
        raise ConfigError(f"--force replaces an existing file; --to {target} writes a directory, which is "
                          "never replaced (remove it first)")
    extra = {"mlx": {"group_size": group_size, "mix": mix or "portable"},
             "gguf": {"force": force, "threads": threads}, "mmproj": {"force": force}}.get(target, {})
    module, func = CONVERTERS[target].split(":")
    path = getattr(importlib.import_module(module), func)(src, out, quant.upper(), imatrix=imatrix, **extra)
    click.echo(f"wrote {path}")
