"""`pdg bench`: speed and memory of a model on a backend, optionally against transformers."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--model", "model_path", required=True, help="Checkpoint directory, GGUF file or MLX directory.")
@click.option("--backend", default="numpy", show_default=True, help="numpy, ggml, mlx or torch.")
@click.option("--quant", default=None, help="Convert to this type first (pdg convert --quant), e.g. Q8_0.")
@click.option("--prompt-len", type=int, default=64, show_default=True, help="Random prompt length (tokens).")
@click.option("--new-tokens", type=int, default=256, show_default=True, help="Tokens to generate per run.")
@click.option("--steps", default="fixed:16", show_default=True,
              help="fixed:N (exactly N steps per canvas, early stop off) or adaptive.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Measured runs.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Discarded runs first.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences denoised together.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for backends that take a count (ggml; torch process-wide) and for the "
                   "transformers reference.  [default: the backend's own]")
@click.option("--compare", type=click.Choice(["transformers"]), default=None,
              help="Also run transformers on the same checkpoint and settings; print the ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema portable_dg.bench/1).")
def bench(model_path: str, backend: str, quant: str | None, prompt_len: int, new_tokens: int, steps: str,
          repeat: int, warmup: int, seed: int, batch: int, threads: int | None, compare: str | None,
          as_json: bool) -> None:
    """Benchmark generation: visible and canvas tok/s, steps per canvas, time to first canvas,
    prefill tok/s, ms per denoising step, peak memory; medians with min and max."""
    from ..bench import BenchSettings, benchmark, format_table

    settings = BenchSettings(prompt_len=prompt_len, new_tokens=new_tokens, steps=steps, repeat=repeat,
                             warmup=warmup, seed=seed, batch=batch, threads=threads)
    report = benchmark(model_path, backend, quant, settings, compare=compare, progress=True).to_dict()
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))
