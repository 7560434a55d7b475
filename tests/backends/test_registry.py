"""The backend registry (backends/__init__.py): names, availability and one-line errors."""

from __future__ import annotations

import importlib.util

import pytest

from portable_dg.backends import BACKENDS, available, get_backend
from portable_dg.errors import ConfigError


def test_numpy_is_always_available():
    assert available("numpy")
    assert get_backend("numpy").name == "numpy"


@pytest.mark.parametrize("name", ["ggml", "mlx", "torch"])
def test_available_matches_the_installed_packages(name):
    """Each optional backend is available exactly when its package (of the same name) is installed."""
    assert available(name) == (importlib.util.find_spec(name) is not None)


def test_unknown_name_is_a_config_error():
    assert set(BACKENDS) == {"numpy", "ggml", "mlx", "torch"}
    with pytest.raises(ConfigError, match="unknown backend 'cobol'"):
        available("cobol")
