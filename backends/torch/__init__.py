"""The PyTorch backend: CUDA is the fast path, CPU runs the tests.

Weights come from the memory-mapped safetensors (`torch.from_numpy` on the map, then one `.to`
onto the device and dtype: a float32 map on CPU is used in place).  Linear layers are `F.linear`;
experts are a grouped GEMM over tokens sorted by expert (`experts.py`); attention is
`F.scaled_dot_product_attention` (scale 1.0, GQA); FP8 e4m3 weights use the FP8 tensor cores on
Hopper/Ada and an exact emulation elsewhere (`fp8.py`).  Sampling ops stay on the device; only
`to_numpy` reads back.

Options of `create`: device "cpu" | "cuda" | "cuda:N"; dtype "float32" (conformance) | "bfloat16";
graphs (CUDA, default on): the whole denoising step (decoder pass + sampler) is captured in a CUDA
graph once per batch change and replayed (`graphs.py`); compile=True runs the step through
`torch.compile` instead (the CPU's step hook).  CUDA paths are untested on a GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from portable_dg.errors import BackendUnavailable, ConfigError

from . import fp8
from .experts import gather_rows, group_by_expert, grouped_mm, scatter_rows
from .fp8 import FP8Weight, host_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Elements of a [rows, V] temporary the sampler ops and the soft lookup make at once (row chunks).
ROW_CHUNK = 1 << 22
FORMATS = ("hf", "fp8")


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w in float32 (torch's fused kernel), returned in `dtype`."""
    return F.rms_norm(x.float(), (x.shape[-1],), None if w is None else w.float(), eps).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, d] * cos + rotate_half(x) * sin, cos/sin [T, 1, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's fused kernel, as transformers'
    gelu_pytorch_tanh."""
    return F.gelu(x, approximate="tanh")


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) in float32, in x's memory when x is float32 (the protocol allows it: the
    model passes the head's [B, L, V] output, and a copy would be a third array of that size)."""
    y = x.float()
    return y.div_(cap).tanh_().mul_(cap)


def token_stats(logits: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(argmax, entropy, sample) of rows [R, V] float32: entropy log(sum e^z) - sum(e^z z) / sum e^z;
    the sample is the first index whose cumulative e^z exceeds u * sum e^z (argmax without uniforms)."""
    argmax = torch.argmax(logits, dim=-1)
    z = logits - logits.amax(-1, keepdim=True)
    e = torch.exp(z)
    total = e.sum(-1)
    entropy = torch.log(total) - z.mul_(e).sum(-1) / total                     # e * z in place
    if uniforms is None:
        return argmax, entropy, argmax
    cdf = e.cumsum_(-1)
    target = uniforms.float()[:, None] * cdf[:, -1:]
    return argmax, entropy, torch.clamp((cdf <= target).sum(-1), max=logits.shape[-1] - 1)


class TorchBackend:
    """Implements `portable_dg.backend.Backend` with PyTorch on one device."""

    name = "torch"

    def __init__(self, device: torch.device, dtype: str, compile: bool = False, graphs: bool = True):
        self.device = device
        self.graphs = graphs and device.type == "cuda" and not compile
        self.compute_dtype = dtype
        self.dtype = DTYPES[dtype]
        self.fp8_native = fp8.native_supported(device, self.dtype)
        self.fp8_grouped_native = fp8.native_supported(device, self.dtype, grouped=True)
        self.compile = compile

    # --- weights and host transfer ------------------------------------------------------------
    def weight(self, name: str, value: Any) -> torch.Tensor | FP8Weight:
        if getattr(value, "qtype", None) == "fp8_e4m3" and hasattr(value, "piece_arrays"):
            return fp8.load_fp8(value, self.device)
        if getattr(value, "qtype", None) == "bf16":       # bfloat16 bits go to the device as they are
            return host_tensor(value.bits).view(torch.bfloat16).to(self.device, self.dtype)
        if hasattr(value, "dequantize"):          # another format's quantized tensor
            value = value.dequantize()
        return host_tensor(np.asarray(value)).to(self.device, self.dtype)

    def asarray(self, a: np.ndarray, compute: bool = False) -> torch.Tensor:
        a = np.asarray(a)
        if a.dtype.kind == "b":
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if a.dtype.kind in "iu":
            return torch.from_numpy(a.astype(np.int64)).to(self.device)
        # Host floats other than activations (self-conditioning logits) stay float32 even in bf16 mode.
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype if compute else torch.float32)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()

    def zeros(self, shape) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=self.dtype, device=self.device)

    # --- dense ops ----------------------------------------------------------------------------
    def embedding(self, table: torch.Tensor | FP8Weight, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(table, FP8Weight):
            return (table.codes[ids].float() * table.scale[ids]).to(self.dtype)
        return F.embedding(ids, table)

    def linear(self, x: torch.Tensor, w: torch.Tensor | FP8Weight) -> torch.Tensor:
        if isinstance(w, FP8Weight):
            flat = x.reshape(-1, x.shape[-1])
            return fp8.linear(flat, w, self.dtype, self.fp8_native).reshape(*x.shape[:-1], -1)
        return F.linear(x.to(w.dtype), w)

    def soft_embedding(self, logits: torch.Tensor, table: torch.Tensor | FP8Weight) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])                               # [R, V]
        parts = [torch.softmax(flat[rows].float(), dim=-1).to(self.dtype) @ self.table_rows(table)
                 for rows in row_chunks(flat)]
        return torch.cat(parts).reshape(*logits.shape[:-1], -1)

    def table_rows(self, table: torch.Tensor | FP8Weight) -> torch.Tensor:
        """A [V, H] table in the compute dtype (an FP8 table dequantized: a full-size temporary)."""
        return table.dequantize(self.dtype) if isinstance(table, FP8Weight) else table

    def expert_linear(self, x: torch.Tensor, w: torch.Tensor | FP8Weight, ids: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        groups = group_by_expert(ids, w.shape[0])
        rows = gather_rows(x.to(self.dtype), groups, k)                       # [T*k, in]
        if isinstance(w, FP8Weight):
            y = fp8.grouped_linear(rows, w, groups.expert_of_row, groups.offsets, self.dtype,
                                   self.fp8_grouped_native)
        else:
            y = grouped_mm(rows, w, groups.offsets)
        return scatter_rows(y, groups, T, k)                                  # [T, k, out]

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        return rms_norm(x, w, eps, self.dtype)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(x, cos, sin)

    def attention(self, q, k, v, *, causal_shift, window, groups=None):
        T, S = q.shape[1], k.shape[1]
        mask = None
        if causal_shift is not None:
            query_pos = torch.arange(T, device=self.device)[:, None] + causal_shift
            key_pos = torch.arange(S, device=self.device)[None, :]
            mask = key_pos <= query_pos                                       # [T, S] True = visible
            if window is not None:
                mask &= query_pos - key_pos < window
            if groups is not None:                                            # [B, 1, T, S]
                keys = torch.cat([groups.new_full((groups.shape[0], S - T), -1), groups], dim=1)   # [B, S]
                same = (groups[:, :, None] == keys[:, None, :]) & (groups[:, :, None] >= 0)
                mask = (mask[None] | same)[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),          # [B, n, T|S, d]
            attn_mask=mask, scale=1.0, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)                                            # [B, T, nq, d]

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.float(), dim=-1)

    def softcap(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        return softcap(x, cap)

    def top_k(self, x: torch.Tensor, k: int):
        return torch.topk(x, k, dim=-1, sorted=True)

    def take(self, vector: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return vector[ids]

    def take_along(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, -1, ids)

    def concat(self, xs: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(xs), dim=axis)

    def sum(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.sum(dim=axis)

    def to_float32(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def to_compute(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    # --- sampler ops --------------------------------------------------------------------------
    def divide_rows(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.div_(t.reshape(-1, *[1] * (x.dim() - 1)))

    def token_stats(self, logits: torch.Tensor, uniforms: torch.Tensor | None):
        flat = logits.reshape(-1, logits.shape[-1])                               # [R, V]
        u = None if uniforms is None else uniforms.reshape(-1)
        parts = [token_stats(flat[rows], None if u is None else u[rows]) for rows in row_chunks(flat)]
        return tuple(torch.cat(column).reshape(logits.shape[:-1]) for column in zip(*parts))

    def argsort(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(x, dim=-1, stable=True)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=-1)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def all(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.all(x, dim=axis)

    def mean(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.mean(x.float(), dim=axis)

    def compile_step(self, fn):
        """The denoising step captured in CUDA graphs (`graphs.py`), or `torch.compile`d when the
        backend was created with compile=True, else run op by op."""
        if self.graphs:
            from .graphs import CapturedStep
            return CapturedStep(fn)
        return torch.compile(fn, dynamic=True) if self.compile else fn


def row_chunks(flat: torch.Tensor) -> list[slice]:
    """Row ranges of a [R, V] tensor holding at most ROW_CHUNK elements each (bounds temporaries)."""
    step = max(1, ROW_CHUNK // flat.shape[-1])
    return [slice(a, min(flat.shape[0], a + step)) for a in range(0, flat.shape[0], step)]


def resolve_device(device: str) -> torch.device:
    """A torch.device, or BackendUnavailable when CUDA is asked for and absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"torch backend: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"torch backend: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"this torch {torch.__version__} is built without CUDA" if torch.version.cuda is None \
                else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            raise BackendUnavailable(f"torch backend: device {device!r} requested but {build}; "
                                     "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"torch backend: device {device!r} requested but only "
                                     f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def create(device: str = "cpu", dtype: str = "float32", compile: bool = False, graphs: bool = True,
           **options: Any) -> TorchBackend:
    """Backend factory used by `portable_dg.backends.get_backend`.

    device: "cpu", "cuda" or "cuda:N"; dtype: "float32" or "bfloat16"; compile: torch.compile the
    denoising step; graphs: capture the step in CUDA graphs (CUDA only)."""
    if options:
        raise ConfigError(f"torch backend: unknown option(s) {', '.join(sorted(options))}; "
                          "expected device, dtype, compile, graphs")
    if dtype not in DTYPES:
        raise ConfigError(f"torch backend: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return TorchBackend(resolve_device(device), dtype, bool(compile), bool(graphs))
