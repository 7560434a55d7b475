"""`pdg eval`: quality of a converted or quantized model against a reference."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--model", "model_path", required=True, help="The model under test (any format).")
@click.option("--reference", "reference_path", required=True,
              help="The reference, usually the unquantized source checkpoint.")
@click.option("--backend", default="numpy", show_default=True, help="Backend of the model under test.")
@click.option("--reference-backend", default="numpy", show_default=True, help="Backend of the reference.")
@click.option("--prompts", type=int, default=4, show_default=True, help="Seeded random prompts.")
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--canvases", type=int, default=1, show_default=True, help="Canvases per prompt.")
@click.option("--steps", type=int, default=None,
              help="Max denoising steps per canvas (default: the reference's generation config).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema portable_dg.eval/1).")
def eval_command(model_path: str, reference_path: str, backend: str, reference_backend: str, prompts: int,
                 prompt_len: int, canvases: int, steps: int | None, seed: int, as_json: bool) -> None:
    """KL divergence (mean, p99) and top-1 agreement of canvas distributions, teacher-forced on
    the reference's denoising trajectory, and the change in adaptive denoising steps per canvas."""
    from ..evaluate import EvalSettings, evaluate, format_report

    settings = EvalSettings(prompts=prompts, prompt_len=prompt_len, canvases=canvases, steps=steps, seed=seed)
    report = evaluate(model_path, reference_path, backend, reference_backend, settings, progress=True)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
