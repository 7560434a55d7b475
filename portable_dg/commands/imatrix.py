"""`pdg imatrix`: gather an importance matrix for GGUF quantization with the numpy model."""

from __future__ import annotations

import sys

import click


@click.command()
@click.option("--model", "model_path", required=True, help="Checkpoint (HF directory, GGUF file or repo id).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text file, one prompt per line (default: random token ids).")
@click.option("--n-random", type=int, default=8, show_default=True,
              help="Random-id prompts when --prompts is not given.")
@click.option("--steps", type=int, default=None, help="Denoising steps per canvas (default: the checkpoint's).")
@click.option("--seed", type=int, default=0, show_default=True)
def imatrix(model_path: str, out: str, prompts: str | None, n_random: int, steps: int | None,
            seed: int) -> None:
    """Run the encoder and one canvas of denoising per calibration prompt; save mean x^2 per input
    column of every linear and expert weight (for `pdg convert/quantize --imatrix`)."""
    from pathlib import Path

    from ..converters.gguf_imatrix import compute_imatrix

    texts = Path(prompts).read_text(encoding="utf-8").splitlines() if prompts else []
    path = compute_imatrix(model_path, out, texts, n_random=n_random, steps=steps, seed=seed,
                           progress=sys.stderr.isatty())
    click.echo(f"wrote {path}")
