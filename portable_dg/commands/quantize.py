"""`pdg quantize`: rewrite a GGUF file at another quantization type."""

from __future__ import annotations

import click


@click.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--quant", required=True,
              help="F32, F16, BF16, Q8_0, Q4_0, Q3_K, Q4_K, Q5_K, Q6_K, Q4_K_M or Q5_K_M.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Importance matrix (.npz from `pdg imatrix`).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--threads", type=int, default=None, help="Rows quantized at once.  [default: every usable core]")
def quantize(src: str, out: str, quant: str, imatrix: str | None, force: bool, threads: int | None) -> None:
    """Requantize the GGUF file SRC (F32/F16/BF16/Q8_0 matrices) to OUT."""
    from ..converters.gguf import requantize_gguf
    from ..errors import ConfigError

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    path = requantize_gguf(src, out, quant.upper(), imatrix=imatrix, force=force, threads=threads)
    click.echo(f"wrote {path}")
