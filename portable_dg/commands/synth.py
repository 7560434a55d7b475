"""`pdg synth`: write a random-weight checkpoint for benchmarks and tests."""

from __future__ import annotations

import json

import click

from ..synth import CONFIG_FORMS, PRESETS, describe, write_synthetic


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--like", "like", required=True, type=click.Choice(sorted(PRESETS)),
              help="Shapes: released (spec §1, ~50 GB bf16), mini (released width, 2 layers, "
                   "32 experts, vocab 32768, ~1.2 GB bf16) or tiny (tests).")
@click.option("--layers", type=int, default=None, help="Number of layers (5 sliding : 1 full, last full).")
@click.option("--vocab", type=int, default=None, help="Vocabulary size (>= 512).")
@click.option("--dtype", type=click.Choice(["bf16", "f32"]), default="bf16", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--config-form", type=click.Choice(CONFIG_FORMS), default="transformers", show_default=True,
              help="config.json with per_layer_config (transformers 5.23) or global_head_dim (released).")
@click.option("--dry-run", is_flag=True, help="Print what would be written (JSON) and write nothing.")
def synth(out: str, like: str, layers: int | None, vocab: int | None, dtype: str, seed: int,
          config_form: str, dry_run: bool) -> None:
    """Write a synthetic (random-weight) DiffusionGemma checkpoint to OUT.

    The files follow the Hugging Face layout (transformers and every pdg backend load them);
    config.json carries "portable_dg_synthetic": true, which `pdg info` reports."""
    if dry_run:
        plan = describe(like, layers, vocab, dtype, config_form)
        click.echo(json.dumps(plan, indent=2))
        return
    path = write_synthetic(out, like, layers=layers, vocab=vocab, dtype=dtype, seed=seed,
                           form=config_form, progress=True)
    click.echo(f"wrote synthetic checkpoint ({like}, {dtype}) to {path}")
