"""The numpy reference backend: float32 by default, float64 on request.

Short and obviously right: it is the oracle every other backend is tested against, not the fast CPU
path (that is ggml).  Weights are converted to the compute dtype once at load time; large products
go to numpy's BLAS.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from portable_dg.errors import ConfigError

# Query rows per attention block: bounds the [n, rows, S] score tensor for long prompts.
ATTENTION_BLOCK = 512


class NumpyBackend:
    """Implements `portable_dg.backend.Backend` with numpy."""

    name = "numpy"

    def __init__(self, dtype: str = "float32"):
        if dtype not in ("float32", "float64"):
            raise ConfigError(f"numpy backend: dtype must be float32 or float64, got {dtype!r}")
        self.compute_dtype = dtype
        self.dtype = np.dtype(dtype)

    # --- weights and host transfer ------------------------------------------------------------
    def weight(self, name: str, value: Any) -> np.ndarray:
        if hasattr(value, "dequantize"):  # a quantized tensor (GGUF, MLX): the oracle computes in float
            value = value.dequantize()
        return np.ascontiguousarray(np.asarray(value), dtype=self.dtype)

    def asarray(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return a.astype(np.int64) if a.dtype.kind in "iub" else a.astype(self.dtype)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    # --- dense ops ----------------------------------------------------------------------------
    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x @ w.T

    def soft_embedding(self, probs: np.ndarray, table: np.ndarray) -> np.ndarray:
        return probs.astype(self.dtype) @ table

    def expert_linear(self, x: np.ndarray, w: np.ndarray, ids: np.ndarray) -> np.ndarray:
        T, k = ids.shape
        out = np.empty((T, k, w.shape[1]), dtype=self.dtype)
        for e in np.unique(ids):                    # group tokens by expert: one GEMM per expert
            t, j = np.nonzero(ids == e)
            rows = x[t] if x.ndim == 2 else x[t, j]  # [n, in]
            out[t, j] = rows @ w[e].T
        return out

    def rms_norm(self, x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
        y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)).astype(self.dtype)
        return y if w is None else y * w

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        theta = positions.astype(np.float32)[:, None] * inv_freq[None, :]     # [T, d/2]
        angle = np.concatenate([theta, theta], axis=-1)[:, None, :]           # [T, 1, d]
        cos, sin = np.cos(angle).astype(self.dtype), np.sin(angle).astype(self.dtype)
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q, k, v, *, causal_shift, window):
        T, nq, d = q.shape
        S, nkv, _ = k.shape
        g = nq // nkv
        qg = q.reshape(T, nkv, g, d).transpose(1, 2, 0, 3)       # [nkv, g, T, d]
        kt = k.transpose(1, 2, 0)[:, None]                        # [nkv, 1, d, S]
        vt = v.transpose(1, 0, 2)[:, None]                        # [nkv, 1, S, d]
        out = np.empty((nkv, g, T, d), dtype=self.dtype)
        key_pos = np.arange(S)
        for start in range(0, T, ATTENTION_BLOCK):
            rows = slice(start, min(T, start + ATTENTION_BLOCK))
            scores = (qg[:, :, rows] @ kt).astype(np.float32 if self.dtype == np.float32 else self.dtype)
            if causal_shift is not None:
                query_pos = np.arange(rows.start, rows.stop)[:, None] + causal_shift
                hidden = key_pos[None, :] > query_pos
                if window is not None:
                    hidden |= query_pos - key_pos[None, :] >= window
                scores = np.where(hidden, -np.inf, scores)
            out[:, :, rows] = self.softmax(scores).astype(self.dtype) @ vt
        return out.transpose(2, 0, 1, 3).reshape(T, nq, d)       # [T, nq, d]

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray:
        c = np.sqrt(2.0 / np.pi).astype(self.dtype) if self.dtype == np.float64 else np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x * x * x)))

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        return cap * np.tanh(x / cap)

    def top_k(self, x: np.ndarray, k: int):
        ids = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, ids, axis=-1), ids

    def take(self, vector: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return vector[ids]

    def concat(self, xs: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def sum(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x.sum(axis=axis)

    # --- sampler ops --------------------------------------------------------------------------
    def argmax(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x, axis=-1)

    def entropy(self, logits: np.ndarray) -> np.ndarray:
        z = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=-1, keepdims=True)
        return (np.log(total) - (e * z).sum(axis=-1, keepdims=True) / total)[..., 0]

    def categorical(self, logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        cdf = np.cumsum(e, axis=-1)
        target = np.asarray(uniforms, cdf.dtype)[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= target).sum(axis=-1), logits.shape[-1] - 1)

    def argsort(self, x: np.ndarray) -> np.ndarray:
        return np.argsort(x, kind="stable")

    def cumsum(self, x: np.ndarray) -> np.ndarray:
        return np.cumsum(x)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def all(self, x: np.ndarray) -> np.ndarray:
        return np.all(x)

    def mean(self, x: np.ndarray) -> np.ndarray:
        return np.mean(x)


def create(dtype: str = "float32", **options: Any) -> NumpyBackend:
    """Backend factory used by `portable_dg.backends.get_backend`."""
    if options:
        raise ConfigError(f"numpy backend: unknown option(s) {', '.join(sorted(options))}")
    return NumpyBackend(dtype)
