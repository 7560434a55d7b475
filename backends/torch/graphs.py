"""The canvas step captured in a CUDA graph.

Within one canvas the decoder pass has static shapes: the canvas is L ids, the self-conditioning
input [L, V], and the KV cache does not change between denoising steps (only `commit` grows it).
So the step is captured once per canvas and replayed for the remaining steps; no KV preallocation
is needed.  The first step (no self-conditioning) runs eagerly, the second runs eagerly on a side
stream as the capture's warm-up (its result is used), then it is captured; steps 3..N replay.
The rope tables live on the device (`TorchBackend.rope_table`) and the experts use the grouped
kernel, so a captured step makes no host transfer and no host sync.

Requires CUDA and `torch._grouped_mm` for the dtype (bf16 on sm80+); verified against the eager
step by `bench/torch_gpu.py --check` on the GPU machine.
"""

from __future__ import annotations

from typing import Any

import torch

from portable_dg.errors import BackendUnavailable

from .experts import grouped_kernel_usable
from .fp8 import FP8Weight


class CanvasGraph:
    """A callable replacing `DiffusionGemma.denoise` that captures the step once per canvas."""

    def __init__(self, network: Any):
        self.network = network
        self.eager = network.denoise
        self.key: tuple[int, int] | None = None     # (id(cache), cache.length) of the captured canvas
        self.graph: torch.cuda.CUDAGraph | None = None
        self.canvas = self.sc = self.logits = None

    def __call__(self, canvas: torch.Tensor, cache: Any, sc_logits: torch.Tensor | None = None) -> torch.Tensor:
        if sc_logits is None:
            return self.eager(canvas, cache, None)
        key = (id(cache), cache.length)
        if key != self.key:
            return self.capture(key, canvas, cache, sc_logits)
        self.canvas.copy_(canvas)
        self.sc.copy_(sc_logits)
        self.graph.replay()
        return self.logits          # valid until the next call (the sampler divides it at once)

    def capture(self, key: tuple[int, int], canvas: torch.Tensor, cache: Any, sc_logits: torch.Tensor) -> torch.Tensor:
        """Warm up on a side stream (returning that result), then capture the step."""
        self.graph = self.logits = None                       # release the previous canvas's pool
        self.canvas, self.sc = canvas.clone(), sc_logits.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = self.eager(self.canvas, cache, self.sc).clone()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.eager(self.canvas, cache, self.sc)
        self.key = key
        return result


def use_cuda_graphs(model: Any) -> CanvasGraph:
    """Route `model`'s canvas steps (a `portable_dg.Model` on the torch backend) through a CUDA graph."""
    backend = model.backend
    if getattr(backend, "name", None) != "torch" or backend.device.type != "cuda":
        raise BackendUnavailable("CUDA graphs need the torch backend on a CUDA device")
    probe = torch.empty(1, 1, dtype=backend.dtype, device=backend.device)
    if not grouped_kernel_usable(probe, probe):
        raise BackendUnavailable(f"CUDA graphs need torch._grouped_mm for {backend.compute_dtype} on this "
                                 "GPU (bf16 on compute capability >= 8.0, torch >= 2.8)")
    if not backend.fp8_native and any(isinstance(w, FP8Weight) for w in model.network.weights.values()):
        raise BackendUnavailable("CUDA graphs with FP8 weights need the FP8 kernels (bf16 compute on "
                                 "compute capability >= 8.9); the emulation reads group sizes on the host")
    step = CanvasGraph(model.network)
    model.network.denoise = step
    return step
