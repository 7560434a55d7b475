"""FP8 e4m3 weights with per-output-channel scales on PyTorch (the FP8-dynamic recipe: W8A8).

Activations are quantized per token (row) at run time, weights per output channel offline.  On CUDA
the products run on the FP8 tensor cores with bf16 output: dense ones through `torch._scaled_mm`
from compute capability 8.9 (Ada), the experts through `torch._scaled_grouped_mm`, which needs 9.0
(Hopper).  Elsewhere the same arithmetic is emulated: the codes are exact in float32, so
(x_codes @ w_codes.T) * x_scale * w_scale in float32 reproduces the kernel up to summation order;
the emulated experts widen one expert's codes at a time, never the whole stack.  (The CUDA paths
are untested on a GPU.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .experts import loop_mm

E4M3_MAX = 448.0


@dataclass
class FP8Weight:
    """codes float8_e4m3fn [..., out, in]; scale float32 [..., out, 1]."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """codes * scale in `dtype` [..., out, in] (a full-size temporary)."""
        return (self.codes.float() * self.scale).to(dtype)


def load_fp8(tensor, device: torch.device) -> FP8Weight:
    """An `FP8Tensor` (portable_dg.converters.torch_fp8) -> FP8Weight on `device`.

    Each stored piece is copied straight from its memory map into a preallocated device tensor,
    so the host never holds a second copy (re-stacked experts included)."""
    shape = tuple(tensor.shape)
    rows = int(torch.Size(shape[:-1]).numel())
    codes = torch.empty((rows, shape[-1]), dtype=torch.uint8, device=device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=device)
    start = 0
    for piece_codes, piece_scale in tensor.piece_arrays():
        n = piece_codes.shape[0]
        codes[start:start + n].copy_(host_tensor(piece_codes))
        scale[start:start + n].copy_(host_tensor(piece_scale))
        start += n
    return FP8Weight(codes.view(torch.float8_e4m3fn).reshape(shape), scale.reshape(*shape[:-1], 1))


def host_tensor(array) -> torch.Tensor:
    """torch view of a (possibly read-only, memory-mapped) numpy array, without copying."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantization: x [N, in] -> (codes float8_e4m3fn [N, in], scale float32 [N, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def native_supported(device: torch.device, dtype: torch.dtype, grouped: bool = False) -> bool:
    """FP8 tensor-core products with bf16 activations: dense from CUDA capability 8.9, grouped
    (experts) from 9.0."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    kernel, capability = ("_scaled_grouped_mm", (9, 0)) if grouped else ("_scaled_mm", (8, 9))
    return hasattr(torch, kernel) and torch.cuda.get_device_capability(device) >= capability


def linear(x: torch.Tensor, w: FP8Weight, dtype: torch.dtype, native: bool) -> torch.Tensor:
    """x [T, in] @ dequant(w) [out, in].T with x quantized per row -> [T, out] in `dtype`."""
    xq, xs = quantize_rows(x)
    if native:
        # _scaled_mm wants the second operand column-major: codes [out, in] transposed is.
        return torch._scaled_mm(xq, w.codes.t(), scale_a=xs, scale_b=w.scale.reshape(1, -1),
                                out_dtype=dtype)
    return (F.linear(xq.float(), w.codes.float()) * xs * w.scale.reshape(1, -1)).to(dtype)


def grouped_linear(rows: torch.Tensor, w: FP8Weight, expert_of_row: torch.Tensor, offsets: torch.Tensor,
                   dtype: torch.dtype, native: bool) -> torch.Tensor:
    """Rows sorted by expert [N, in] through their experts' weights [E, out, in] -> [N, out].

    offsets [E] int32 are the cumulative row counts (group ends); expert_of_row [N] the same
    grouping as ids, used to pick each row's weight scales in the emulation."""
    xq, xs = quantize_rows(rows)
    if native:
        return torch._scaled_grouped_mm(xq, w.codes.transpose(-2, -1), xs.reshape(-1),
                                        w.scale.reshape(w.scale.shape[0], -1), offs=offsets,
                                        out_dtype=dtype)
    products = loop_mm(xq.float(), w.codes, offsets, lambda e: w.codes[e].float())                # [N, out]
    return (products * xs * w.scale[expert_of_row, :, 0]).to(dtype)
