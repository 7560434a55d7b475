"""`pdg convert`: write a checkpoint in another format (GGUF now; MLX and torch formats register here)."""

from __future__ import annotations

import importlib
import sys

import click

# target format -> "module:function(src, out, quant, *, imatrix, progress)"
CONVERTERS = {
    "gguf": "portable_dg.converters.gguf:convert_to_gguf",
}


@click.command()
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=True))
@click.option("--to", "target", required=True, type=click.Choice(sorted(CONVERTERS)), help="Output format.")
@click.option("--quant", default="F16", show_default=True,
              help="GGUF: F32, F16, BF16, Q8_0, Q4_0, Q3_K, Q4_K, Q5_K, Q6_K, Q4_K_M or Q5_K_M.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Importance matrix (.npz from `pdg imatrix`) for the quantized types.")
def convert(src: str, out: str, target: str, quant: str, imatrix: str | None) -> None:
    """Convert the checkpoint SRC (directory or hub repo id) to OUT."""
    module, func = CONVERTERS[target].split(":")
    path = getattr(importlib.import_module(module), func)(src, out, quant.upper(), imatrix=imatrix,
                                                          progress=sys.stderr.isatty())
    click.echo(f"wrote {path}")
