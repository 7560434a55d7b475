"""`pdg imatrix`: gather an importance matrix for GGUF quantization with the numpy model."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "model_path", required=True, help="Checkpoint (HF directory, GGUF file or repo id).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text file, one prompt per line (default: random token ids).")
@click.option("--n-random", type=int, default=8, show_default=True,
              help="Random-id prompts when --prompts is not given.")
@click.option("--steps", type=int, default=None, help="Denoising steps per canvas (default: the checkpoint's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def imatrix(model_path: str, out: str, force: bool, prompts: str | None, n_random: int, steps: int | None,
            seed: int) -> None:
    """Run the encoder and one canvas of denoising per calibration prompt; save mean x^2 per input
    column of every linear and expert weight (for `pdg convert/quantize --imatrix`)."""
    from pathlib import Path

    from ..converters.gguf_imatrix import compute_imatrix

    texts = read_prompts(Path(prompts)) if prompts else None
    path = compute_imatrix(model_path, out, texts, n_random=n_random, steps=steps, seed=seed, force=force)
    click.echo(f"wrote {path}")


def read_prompts(path) -> list[str]:
    """The lines of a calibration text file (UTF-8), with a one-line error if it cannot be read."""
    from ..errors import ConfigError

    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
