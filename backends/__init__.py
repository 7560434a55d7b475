"""Compute backends, one package each, imported only when asked for (heavy imports stay inside).

Each backend module exposes `create(**options) -> Backend` and `FORMATS`, the on-disk formats whose
tensors its `weight()` accepts without dequantizing first."""

from __future__ import annotations

import importlib
from typing import Any

from portable_dg.errors import BackendUnavailable, ConfigError

BACKENDS = {
    "numpy": "portable_dg.backends.numpy",
    "mlx": "portable_dg.backends.mlx",
    "ggml": "portable_dg.backends.ggml",
    "torch": "portable_dg.backends.torch",
}


def get_backend(name: str, **options: Any):
    """Create a backend by name; unknown names and missing packages give a one-line error."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("portable_dg.backends"):
            raise BackendUnavailable(f"backend {name!r} is not part of this installation") from None
        raise BackendUnavailable(f"backend {name!r} needs the package {e.name!r}: "
                                 f"pip install 'portable-dg[{name}]'") from None
    return module.create(**options)


def available(name: str) -> bool:
    """Whether the backend `name` is installed and its runtime imports on this machine."""
    try:
        get_backend(name)
    except BackendUnavailable:
        return False
    return True
