"""Compute backends, one package each, imported only when asked for (heavy imports stay inside).

Each backend module exposes `create(**options) -> Backend` and `FORMATS`, the on-disk formats whose
tensors its `weight()` accepts without dequantizing first."""

from __future__ import annotations

import importlib
from typing import Any

from portable_dg.errors import BackendUnavailable, ConfigError

# Parameters from which the CPU path is torch rather than numpy (numpy widens every weight to float32
# and runs op by op: right for the small models, too slow and too big for released ones).
LARGE_MODEL = 500_000_000

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


def auto_backend(source: Any) -> tuple[str, dict[str, Any]]:
    """The backend (name, options) `--backend auto` picks for a checkpoint on this machine.

    GGUF -> ggml (its quantized kernels); an MLX directory on Apple Silicon -> mlx; CUDA visible ->
    torch in bfloat16; otherwise the best CPU path: numpy for small models (its per-op overhead
    is the lowest), torch for large ones: bfloat16 when the checkpoint is and the CPU multiplies
    bfloat16 in hardware or float32 copies would not fit, else float32.  Without the package a
    choice needs, numpy (which reads every format)."""
    import platform
    import sys

    if source.format == "gguf" and available("ggml"):
        return "ggml", {}
    if source.format == "mlx" and sys.platform == "darwin" and platform.machine() == "arm64" and available("mlx"):
        return "mlx", {}
    if source.format in ("hf", "fp8") and available("torch"):
        import torch

        if torch.cuda.is_available():
            return "torch", {"device": "cuda", "dtype": "bfloat16"}
        total, _ = source.config.parameter_counts()
        if total >= LARGE_MODEL:
            bf16 = "BF16" in source.metadata.get("dtypes", ()) or source.format == "fp8"
            if bf16 and not cpu_has_bf16() and float32_fits(total):
                bf16 = False             # float32 GEMM is about 10x torch's bfloat16 loop on such a CPU
            return "torch", {"dtype": "bfloat16" if bf16 else "float32"}
    return "numpy", {}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, ARM BF16).  Without
    it torch's bfloat16 matrix products on the CPU run a reference loop: 6-8 GFLOP/s on this
    project's AVX2 machine, against 57-90 GFLOP/s in float32 (bench/RESULTS.md)."""
    import subprocess
    import sys

    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    try:
        with open("/proc/cpuinfo") as f:
            words = {w for line in f if line.startswith(("flags", "Features")) for w in line.split()}
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def float32_fits(parameters: int) -> bool:
    """Whether float32 copies of this many weights fit in 90% of the host's available memory."""
    from portable_dg.runtime import available_memory

    have, _ = available_memory(None)
    return have is not None and 4 * parameters <= 0.9 * have


def available(name: str) -> bool:
    """Whether the backend `name` is installed and its runtime imports on this machine."""
    try:
        get_backend(name)
    except BackendUnavailable:
        return False
    return True
