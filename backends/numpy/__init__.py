"""The numpy reference backend: float32 by default, float64 on request.

Short and obviously right: it is the oracle every other backend is tested against, not the fast CPU
path (that is ggml).  Weights are converted to the compute dtype once at load time; large products
go to numpy's BLAS.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from portable_dg.errors import ConfigError

# Attention scores computed at once (query rows x keys x heads): bounds the score tensor for long prompts.
ATTENTION_SCORES = 1 << 24
# Elements of a [rows, V] temporary the sampler ops and the soft lookup make at once (row chunks).
ROW_CHUNK = 1 << 24


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

    def asarray(self, a: np.ndarray, compute: bool = False) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype.kind == "b":
            return a.copy()
        if a.dtype.kind in "iu":
            return a.astype(np.int64)
        return a.astype(self.dtype if compute else np.promote_types(np.float32, a.dtype))

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape) -> np.ndarray:
        return np.zeros(tuple(shape), self.dtype)

    # --- dense ops ----------------------------------------------------------------------------
    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])   # one GEMM over all tokens

    def soft_embedding(self, logits: np.ndarray, table: np.ndarray) -> np.ndarray:
        flat = logits.reshape(-1, logits.shape[-1])                               # [R, V]
        out = np.empty((flat.shape[0], table.shape[1]), self.dtype)
        for rows in row_chunks(flat):
            probs = flat[rows] - flat[rows].max(axis=-1, keepdims=True)          # softmax, one temporary
            np.exp(probs, out=probs)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[rows] = probs.astype(self.dtype, copy=False) @ table
        return out.reshape(*logits.shape[:-1], table.shape[1])

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

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q, k, v, *, causal_shift, window, groups=None):
        n, T, nq, d = q.shape
        S, nkv = k.shape[1], k.shape[2]
        g = nq // nkv
        # the g query heads of a kv head as one matrix of g*T rows (row j*T + t = head j, token t)
        qh = q.reshape(n, T, nkv, g, d).transpose(0, 2, 3, 1, 4).reshape(n, nkv, g * T, d)
        kt = k.transpose(0, 2, 3, 1)                              # [B, nkv, d, S]
        vh = v.transpose(0, 2, 1, 3)                              # [B, nkv, S, d]
        out = np.empty((n, nkv, g * T, d), dtype=self.dtype)
        score_dtype = np.promote_types(self.dtype, np.float32)
        block = max(1, ATTENTION_SCORES // (n * nkv * S))         # query rows per block
        for start in range(0, g * T, block):
            rows = slice(start, min(g * T, start + block))
            scores = (qh[:, :, rows] @ kt).astype(score_dtype, copy=False)    # [B, nkv, r, S]
            if causal_shift is not None:
                hidden = hidden_keys(np.arange(rows.start, rows.stop) % T + causal_shift, S, window)
                if groups is not None:                            # [B, 1, r, S]: per sequence
                    hidden = (hidden & ~same_group(groups, np.arange(rows.start, rows.stop) % T, S))[:, None]
                    hidden = np.broadcast_to(hidden, scores.shape)
                scores[..., hidden] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)          # softmax in place
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            out[:, :, rows] = scores.astype(self.dtype, copy=False) @ vh
        return out.reshape(n, nkv, g, T, d).transpose(0, 3, 1, 2, 4).reshape(n, T, nq, d)   # [B, T, nq, d]

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray:
        c = np.sqrt(2.0 / np.pi).astype(self.dtype) if self.dtype == np.float64 else np.float32(np.sqrt(2.0 / np.pi))
        inner = x * 0.044715                            # the formula's operations in its order, in place
        inner *= x
        inner *= x
        inner += x
        inner *= c
        np.tanh(inner, out=inner)
        inner += 1.0
        inner *= x
        inner *= 0.5
        return inner

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        if not x.flags.writeable:
            x = x.copy()
        np.divide(x, cap, out=x)                          # in place: [B, L, V] stays one array
        np.tanh(x, out=x)
        return np.multiply(x, cap, out=x)

    def top_k(self, x: np.ndarray, k: int):
        if 8 * k < x.shape[-1]:      # a vocabulary: partition (O(V)), then order the k: largest, then lowest id
            part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
            values = np.take_along_axis(x, part, axis=-1)
            order = np.lexsort((part, -values), axis=-1)
            ids = np.take_along_axis(part, order, axis=-1)
        else:
            ids = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, ids, axis=-1), ids

    def take(self, vector: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return vector[ids]

    def take_along(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, ids, axis=-1)

    def concat(self, xs: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def sum(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x.sum(axis=axis)

    def to_float32(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32)

    def to_compute(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, self.dtype)

    # --- sampler ops --------------------------------------------------------------------------
    def divide_rows(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t).reshape(-1, *[1] * (x.ndim - 1))
        return np.divide(x, t, out=x) if x.flags.writeable and x.dtype == np.result_type(x, t) else x / t

    def token_stats(self, logits: np.ndarray, uniforms: np.ndarray | None):
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)                                             # [R, V]
        argmax = np.empty(flat.shape[0], np.int64)
        entropy = np.empty(flat.shape[0], np.float32)
        sample = argmax if uniforms is None else np.empty(flat.shape[0], np.int64)
        u = None if uniforms is None else np.asarray(uniforms).reshape(-1)
        for rows in row_chunks(flat):
            x = flat[rows]
            argmax[rows] = np.argmax(x, axis=-1)
            z = x - x.max(axis=-1, keepdims=True)
            e = np.exp(z)
            total = e.sum(axis=-1, keepdims=True)
            z *= e                                             # e * z, in place (two temporaries a chunk)
            entropy[rows] = (np.log(total) - z.sum(axis=-1, keepdims=True) / total)[:, 0]
            if u is not None:                                  # inverse CDF: first index with cdf > u * total
                cdf = np.cumsum(e, axis=-1, out=e)
                target = u[rows].astype(cdf.dtype)[:, None] * cdf[:, -1:]
                sample[rows] = np.minimum((cdf <= target).sum(axis=-1), V - 1)
        shape = logits.shape[:-1]
        return argmax.reshape(shape), entropy.reshape(shape), sample.reshape(shape)

    def argsort(self, x: np.ndarray) -> np.ndarray:
        return np.argsort(x, axis=-1, kind="stable")

    def cumsum(self, x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=-1)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def all(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.all(x, axis=axis)

    def mean(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.mean(x, axis=axis)


def hidden_keys(query_pos: np.ndarray, S: int, window: int | None) -> np.ndarray:
    """[r, S] bool: key j is hidden from the query at position query_pos[i]: after it (causal), or
    `window` or more positions before it when there is a window."""
    query, key = query_pos[:, None], np.arange(S)[None, :]
    hidden = key > query
    if window is not None:
        hidden |= query - key >= window
    return hidden


def same_group(groups: np.ndarray, tokens: np.ndarray, S: int) -> np.ndarray:
    """[B, r, S] bool: query token tokens[i] and key j are in the same group (>= 0); the last T
    keys are the T query tokens (groups [B, T]), earlier keys are in none."""
    n, T = groups.shape
    keys = np.concatenate([np.full((n, S - T), -1, groups.dtype), groups], axis=1)     # [B, S]
    query = groups[:, tokens][:, :, None]                                             # [B, r, 1]
    return (query == keys[:, None, :]) & (query >= 0)


def row_chunks(flat: np.ndarray) -> list[slice]:
    """Row ranges of a [R, V] array holding at most ROW_CHUNK elements each."""
    step = max(1, ROW_CHUNK // flat.shape[-1])
    return [slice(a, min(flat.shape[0], a + step)) for a in range(0, flat.shape[0], step)]


def create(dtype: str = "float32", **options: Any) -> NumpyBackend:
    """Backend factory used by `portable_dg.backends.get_backend`."""
    if options:
        raise ConfigError(f"numpy backend: unknown option(s) {', '.join(sorted(options))}")
    return NumpyBackend(dtype)
