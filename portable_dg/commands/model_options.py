"""The options that choose and load a model, shared by the commands that run one (`pdg serve`, `pdg chat`)."""

from __future__ import annotations

from typing import Any, Callable

import click

OPTIONS = [
    click.option("--model", "model_path", default=None,
                 help="Checkpoint directory, .gguf file or hub repo id (default: the bundled Sudoku model)."),
    click.option("--backend", default="numpy", show_default=True, help="numpy, ggml, mlx or torch."),
    click.option("--device", default=None, help="Backend device (torch: cpu or cuda)."),
    click.option("--dtype", default=None, help="Backend compute dtype (numpy: float32 or float64)."),
]


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --model, --backend, --device and --dtype to a click command."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command


def load_model(model_path: str | None, backend: str, device: str | None, dtype: str | None) -> Any:
    """The model those options name (the bundled Sudoku model when --model is not given)."""
    import portable_dg

    if model_path is None:
        from ..sudoku import default_model_path
        model_path = default_model_path()
    options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return portable_dg.load(model_path, backend=backend, **options)
