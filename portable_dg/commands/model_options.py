"""The options that choose and load a model, shared by the commands that run one (`pdg generate`,
`pdg serve`, `pdg chat`)."""

from __future__ import annotations

from typing import Any, Callable

import click

OPTIONS = [
    click.option("--model", "model_path", default=None,
                 help="Checkpoint directory, .gguf file or hub repo id (default: the bundled Sudoku model, "
                      "whose chat template takes a prompt holding an 81-character puzzle)."),
    click.option("--backend", default="auto", show_default=True,
                 help="auto, numpy, ggml, mlx or torch (auto: GGUF -> ggml, MLX on Apple Silicon -> mlx, "
                      "CUDA -> torch, else the best CPU path)."),
    click.option("--device", default=None, help="Backend device (torch: cpu or cuda)."),
    click.option("--dtype", default=None, help="Backend compute dtype (numpy: float32 or float64)."),
]


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --model, --backend, --device and --dtype to a click command."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command


def load_model(model_path: str | None, backend: str, device: str | None, dtype: str | None,
               mmproj: str | None = None) -> Any:
    """The model those options name (the bundled Sudoku model when --model is not given); mmproj:
    a GGUF model's vision projector file."""
    import portable_dg

    if model_path is None:
        from ..sudoku import default_model_path
        model_path = default_model_path()
    options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return portable_dg.load(model_path, backend=backend, mmproj=mmproj, **options)
