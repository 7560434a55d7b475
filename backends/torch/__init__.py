"""The PyTorch backend: CUDA is the fast path, CPU runs the tests.

Weights come from the memory-mapped safetensors (`torch.from_numpy` on the map, then one `.to`
onto the device and dtype: a float32 map on CPU is used in place).  Linear layers are `F.linear`;
experts are a grouped GEMM over tokens sorted by expert (`experts.py`); attention is
`F.scaled_dot_product_attention` (scale 1.0, GQA); FP8 e4m3 weights use the FP8 tensor cores on
Hopper/Ada and an exact emulation elsewhere (`fp8.py`).  Sampling ops stay on the device; only
`to_numpy` reads back.

Options of `create`: device "cpu" | "cuda" | "cuda:N"; dtype "float32" (conformance) | "bfloat16";
compile=True compiles the elementwise pieces of a layer (norms, RoPE, activation, soft-cap,
entropy) with `torch.compile`.  The whole canvas step is captured in a CUDA graph by
`portable_dg.backends.torch.graphs.use_cuda_graphs(model)`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from portable_dg.errors import BackendUnavailable, ConfigError

from . import fp8
from .experts import gather_rows, group_by_expert, grouped_mm, scatter_rows
from .fp8 import FP8Weight, host_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = ("hf", "fp8")
GELU_C = math.sqrt(2.0 / math.pi)


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w in float32, returned in `dtype`."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y if w is None else y * w.float()).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, d] * cos + rotate_half(x) * sin, cos/sin [T, 1, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(GELU_C * (x + 0.044715 * x * x * x)))


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) in float32."""
    return cap * torch.tanh(x.float() / cap)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the last axis, in float32: log(sum e^z) - sum(e^z z) / sum e^z."""
    z = logits.float() - logits.float().amax(-1, keepdim=True)
    e = torch.exp(z)
    total = e.sum(-1)
    return torch.log(total) - (e * z).sum(-1) / total


class TorchBackend:
    """Implements `portable_dg.backend.Backend` with PyTorch on one device."""

    name = "torch"

    def __init__(self, device: torch.device, dtype: str, compile: bool = False):
        self.device = device
        self.compute_dtype = dtype
        self.dtype = DTYPES[dtype]
        self.fp8_native = fp8.native_supported(device, self.dtype)
        self.rope_tables: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.norm, self.rotate, self.gelu, self.cap, self.entropy_of = (
            rms_norm, rotate, gelu_tanh, softcap, entropy)
        if compile:
            self.norm, self.rotate, self.gelu, self.cap, self.entropy_of = (
                torch.compile(f, dynamic=True) for f in (rms_norm, rotate, gelu_tanh, softcap, entropy))

    # --- weights and host transfer ------------------------------------------------------------
    def weight(self, name: str, value: Any) -> torch.Tensor | FP8Weight:
        if getattr(value, "qtype", None) == "fp8_e4m3" and hasattr(value, "piece_arrays"):
            return fp8.load_fp8(value, self.device)
        if hasattr(value, "dequantize"):          # another format's quantized tensor
            value = value.dequantize()
        return host_tensor(np.asarray(value)).to(self.device, self.dtype)

    def asarray(self, a: np.ndarray) -> torch.Tensor:
        a = np.asarray(a)
        if a.dtype.kind in "iub":
            return torch.from_numpy(a.astype(np.int64)).to(self.device)
        # Host floats are logits (self-conditioning) and sampling uniforms: keep them float32 even
        # in bf16 mode, as the logits the model returns are float32 (bf16 uniforms would skew sampling).
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, torch.float32)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()

    # --- dense ops ----------------------------------------------------------------------------
    def embedding(self, table: torch.Tensor | FP8Weight, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(table, FP8Weight):
            return (table.codes[ids].float() * table.scale[ids]).to(self.dtype)
        return F.embedding(ids, table)

    def linear(self, x: torch.Tensor, w: torch.Tensor | FP8Weight) -> torch.Tensor:
        if isinstance(w, FP8Weight):
            return fp8.linear(x, w, self.dtype, self.fp8_native)
        return F.linear(x.to(w.dtype), w)

    def soft_embedding(self, probs: torch.Tensor, table: torch.Tensor | FP8Weight) -> torch.Tensor:
        matrix = table.dequantize(self.dtype) if isinstance(table, FP8Weight) else table
        return probs.to(self.dtype) @ matrix

    def expert_linear(self, x: torch.Tensor, w: torch.Tensor | FP8Weight, ids: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        groups = group_by_expert(ids, w.shape[0])
        rows = gather_rows(x.to(self.dtype), groups, k)                       # [T*k, in]
        if isinstance(w, FP8Weight):
            y = fp8.grouped_linear(rows, w, groups.expert_of_row, groups.offsets, self.dtype, self.fp8_native)
        else:
            y = grouped_mm(rows, w, groups.offsets)
        return scatter_rows(y, groups, T, k)                                  # [T, k, out]

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        return self.norm(x, w, eps, self.dtype)

    def rope(self, x: torch.Tensor, positions: np.ndarray, inv_freq: np.ndarray) -> torch.Tensor:
        cos, sin = self.rope_table(inv_freq, int(positions[-1]) + 1)
        start = int(positions[0])
        if not np.array_equal(positions, np.arange(start, start + len(positions))):
            index = torch.from_numpy(np.asarray(positions, np.int64)).to(self.device)
            return self.rotate(x, cos[index], sin[index])
        return self.rotate(x, cos[start:start + len(positions)], sin[start:start + len(positions)])

    def rope_table(self, inv_freq: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, 1, d] in the compute dtype for positions 0..P-1 (P >= length), kept on the
        device and grown by doubling, so steady-state steps upload nothing (CUDA graphs need that).
        Computed on the host in float32 exactly as the numpy reference does."""
        key = inv_freq.tobytes()
        table = self.rope_tables.get(key)
        if table is None or table[0].shape[0] < length:
            size = max(1024, 1 << (length - 1).bit_length())
            theta = np.arange(size, dtype=np.float32)[:, None] * inv_freq[None, :]   # [P, d/2]
            angle = np.concatenate([theta, theta], axis=-1)[:, None, :]              # [P, 1, d]
            table = tuple(torch.from_numpy(f(angle)).to(self.device, self.dtype) for f in (np.cos, np.sin))
            self.rope_tables[key] = table
        return table

    def attention(self, q, k, v, *, causal_shift, window):
        T, S = q.shape[0], k.shape[0]
        mask = None
        if causal_shift is not None:
            query_pos = torch.arange(T, device=self.device)[:, None] + causal_shift
            key_pos = torch.arange(S, device=self.device)[None, :]
            mask = key_pos <= query_pos                                       # [T, S] True = visible
            if window is not None:
                mask &= query_pos - key_pos < window
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # [1, n, T|S, d]
            attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)                                         # [T, nq, d]

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        return self.gelu(x)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.float(), dim=-1)

    def softcap(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        return self.cap(x, cap)

    def top_k(self, x: torch.Tensor, k: int):
        return torch.topk(x, k, dim=-1, sorted=True)

    def take(self, vector: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return vector[ids]

    def concat(self, xs: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(xs), dim=axis)

    def sum(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.sum(dim=axis)

    # --- sampler ops --------------------------------------------------------------------------
    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(x, dim=-1)

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        return self.entropy_of(logits)

    def categorical(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        e = torch.exp(logits.float() - logits.float().amax(-1, keepdim=True))
        cdf = torch.cumsum(e, dim=-1)
        target = uniforms.float()[:, None] * cdf[:, -1:]
        return torch.clamp((cdf <= target).sum(-1), max=logits.shape[-1] - 1)

    def argsort(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(x, stable=True)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=0)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def all(self, x: torch.Tensor) -> torch.Tensor:
        return torch.all(x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(x.float())


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


def create(device: str = "cpu", dtype: str = "float32", compile: bool = False, **options: Any) -> TorchBackend:
    """Backend factory used by `portable_dg.backends.get_backend`.

    device: "cpu", "cuda" or "cuda:N"; dtype: "float32" or "bfloat16"; compile: torch.compile the
    elementwise pieces of a layer."""
    if options:
        raise ConfigError(f"torch backend: unknown option(s) {', '.join(sorted(options))}; "
                          "expected device, dtype, compile")
    if dtype not in DTYPES:
        raise ConfigError(f"torch backend: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return TorchBackend(resolve_device(device), dtype, bool(compile))
