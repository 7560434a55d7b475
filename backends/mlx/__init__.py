"""The MLX backend: Apple Silicon (Metal); on Linux `mlx[cpu]` runs it for tests only.

Fast paths: `mx.fast.rms_norm`, `mx.fast.rope` (HF's rotate-half layout with explicit frequencies,
so the proportional rope's zero frequencies pass their pairs through unrotated),
`mx.fast.scaled_dot_product_attention` (scale 1.0, native GQA, a boolean mask for the encoder),
`mx.quantized_matmul` / `mx.gather_qmm` on weights kept packed as `mx.quantize` made them (affine
2-8 bits, mxfp4), and `mx.gather_mm` over stacked experts with the tokens sorted by expert for a
whole canvas.  Elementwise chains (GELU, soft-cap, entropy, inverse-CDF sampling) are `mx.compile`d
into single kernels; the whole canvas step is not, because the model is written once against the
backend protocol and compiling it would need a protocol hook (see the report in issue 3).

MLX is lazy: nothing runs until a host read.  The sampler reads its stop decision once per step,
which evaluates the step's whole graph, so graphs never grow across steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from portable_dg.converters.mlx import MLXQuantized
from portable_dg.errors import ConfigError

import mlx.core as mx

FORMATS = ("hf", "mlx")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
SORT_THRESHOLD = 64   # expert rows at or above which tokens are sorted by expert (as mlx-lm does)
GELU_C = math.sqrt(2.0 / math.pi)


@dataclass
class QuantizedWeight:
    """A weight kept packed on the device, in `mx.quantize`'s layout."""

    weight: mx.array            # uint32 [..., out, in * bits / 32]
    scales: mx.array            # compute dtype (affine) or uint8 (mxfp4) [..., out, in / group_size]
    biases: mx.array | None     # affine only
    group_size: int
    bits: int
    mode: str

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, packed = self.weight.shape
        return (*lead, packed * 32 // self.bits)

    @property
    def params(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@mx.compile
def gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(GELU_C * (x + 0.044715 * x * x * x)))


@mx.compile
def entropy(logits: mx.array) -> mx.array:
    z = logits - mx.max(logits, axis=-1, keepdims=True)
    e = mx.exp(z)
    total = mx.sum(e, axis=-1)
    return mx.log(total) - mx.sum(e * z, axis=-1) / total


@mx.compile
def categorical(logits: mx.array, uniforms: mx.array) -> mx.array:
    cdf = mx.cumsum(mx.exp(logits - mx.max(logits, axis=-1, keepdims=True)), axis=-1)  # [L, V]
    target = uniforms[:, None] * cdf[:, -1:]
    return mx.minimum(mx.sum(cdf <= target, axis=-1), logits.shape[-1] - 1)


def attention_mask(T: int, S: int, causal_shift: int, window: int | None) -> mx.array:
    """[T, S] bool, True where query i may read key j (j <= i + shift, within the window)."""
    query = mx.arange(T)[:, None] + causal_shift
    key = mx.arange(S)[None, :]
    visible = key <= query
    return visible if window is None else visible & (query - key < window)


class MLXBackend:
    """Implements `portable_dg.backend.Backend` with MLX."""

    name = "mlx"

    def __init__(self, dtype: str = "bfloat16"):
        if dtype not in DTYPES:
            raise ConfigError(f"mlx backend: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.compute_dtype = dtype
        self.dtype = DTYPES[dtype]
        self.rope_freqs: dict[bytes, mx.array] = {}

    # --- weights and host transfer ------------------------------------------------------------
    def weight(self, name: str, value: Any) -> mx.array | QuantizedWeight:
        if isinstance(value, MLXQuantized):
            def floats(a):
                return mx.array(a).astype(self.dtype)

            w = QuantizedWeight(mx.array(value.weight),
                                floats(value.scales) if value.mode == "affine" else mx.array(value.scales),
                                None if value.biases is None else floats(value.biases),
                                value.group_size, value.bits, value.mode)
            mx.eval(w.weight, w.scales, *([] if w.biases is None else [w.biases]))
            return w
        if hasattr(value, "dequantize"):       # another format's quantized tensor (GGUF, ...)
            value = value.dequantize()
        array = mx.array(np.asarray(value, np.float32))
        # float experts [E, out, in] stay float32 on the CPU, whose gather_mm kernel is float32 only
        if not (array.ndim == 3 and mx.default_device().type == mx.cpu):
            array = array.astype(self.dtype)
        mx.eval(array)
        return array

    def asarray(self, a: np.ndarray) -> mx.array:
        a = np.asarray(a)
        if a.dtype == np.bool_:
            return mx.array(a)
        # floats stay at least float32 on the host side: bf16 uniforms or SC logits would skew sampling
        return mx.array(a.astype(np.int64)) if a.dtype.kind in "iu" else mx.array(a, mx.float32)

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32) if x.dtype in (mx.bfloat16, mx.float16) else x)

    # --- dense ops ----------------------------------------------------------------------------
    def embedding(self, table, ids: mx.array) -> mx.array:
        if isinstance(table, QuantizedWeight):
            rows = mx.dequantize(table.weight[ids], table.scales[ids],
                                 None if table.biases is None else table.biases[ids], **table.params)
            return rows.astype(self.dtype)
        return table[ids]

    def linear(self, x: mx.array, w) -> mx.array:
        if isinstance(w, QuantizedWeight):
            return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True, **w.params)
        return x @ w.T

    def soft_embedding(self, probs: mx.array, table) -> mx.array:
        probs = probs.astype(self.dtype)
        if isinstance(table, QuantizedWeight):           # probs [T, V] x packed [V, H], no dequantized copy
            return mx.quantized_matmul(probs, table.weight, table.scales, table.biases, transpose=False,
                                       **table.params)
        return probs @ table

    def gather(self, x: mx.array, w, experts: mx.array, sorted_indices: bool) -> mx.array:
        """x [..., 1, in] times w[experts] -> [..., 1, out] (experts broadcast against x's batch)."""
        if isinstance(w, QuantizedWeight):
            return mx.gather_qmm(x, w.weight, w.scales, w.biases, rhs_indices=experts, transpose=True,
                                 sorted_indices=sorted_indices, **w.params)
        out = mx.gather_mm(x.astype(w.dtype), w.swapaxes(-1, -2), rhs_indices=experts,
                           sorted_indices=sorted_indices)
        return out.astype(x.dtype)

    def expert_linear(self, x: mx.array, w, ids: mx.array) -> mx.array:
        T, k = ids.shape
        n_in = x.shape[-1]
        if T * k < SORT_THRESHOLD:
            rows = x[:, None, None, :] if x.ndim == 2 else x[:, :, None, :]    # [T, 1|k, 1, in]
            return self.gather(rows, w, ids, sorted_indices=False)[:, :, 0, :]   # [T, k, out]
        flat = ids.reshape(-1)                                                 # [T*k]
        order = mx.argsort(flat)
        rows = x[order // k] if x.ndim == 2 else x.reshape(T * k, n_in)[order]  # [T*k, in], by expert
        out = self.gather(rows[:, None, :], w, flat[order], sorted_indices=True)  # [T*k, 1, out]
        return out[mx.argsort(order), 0, :].reshape(T, k, -1)                   # back to token order

    def rms_norm(self, x: mx.array, w: mx.array | None, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, w, eps)

    def rope(self, x: mx.array, positions: np.ndarray, inv_freq: np.ndarray) -> mx.array:
        positions = np.asarray(positions)
        start = int(positions[0]) if len(positions) else 0
        if not np.array_equal(positions, np.arange(start, start + len(positions))):
            return self.rope_at(x, positions, inv_freq)
        out = mx.fast.rope(x.swapaxes(0, 1), x.shape[-1], traditional=False, base=None, scale=1.0,
                           offset=start, freqs=self.wavelengths(inv_freq))            # on [n, T, d]
        return out.swapaxes(0, 1)

    def wavelengths(self, inv_freq: np.ndarray) -> mx.array:
        """mx.fast.rope's `freqs` (1 / inv_freq; a zero frequency becomes inf: no rotation)."""
        key = inv_freq.tobytes()
        if key not in self.rope_freqs:
            with np.errstate(divide="ignore"):
                self.rope_freqs[key] = mx.array((1.0 / inv_freq.astype(np.float64)).astype(np.float32))
        return self.rope_freqs[key]

    def rope_at(self, x: mx.array, positions: np.ndarray, inv_freq: np.ndarray) -> mx.array:
        """Rotate-half RoPE at arbitrary positions (the fast kernel needs consecutive ones)."""
        theta = positions.astype(np.float32)[:, None] * inv_freq[None, :]       # [T, d/2]
        angle = mx.array(np.concatenate([theta, theta], axis=-1)[:, None, :])    # [T, 1, d]
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * mx.cos(angle) + rotated * mx.sin(angle)).astype(x.dtype)

    def attention(self, q, k, v, *, causal_shift, window):
        T, S = q.shape[0], k.shape[0]
        mask = None if causal_shift is None else attention_mask(T, S, causal_shift, window)
        out = mx.fast.scaled_dot_product_attention(
            q.swapaxes(0, 1)[None], k.swapaxes(0, 1)[None], v.swapaxes(0, 1)[None],  # [1, n, T|S, d]
            scale=1.0, mask=mask)
        return out[0].swapaxes(0, 1)                                                   # [T, nq, d]

    def gelu_tanh(self, x: mx.array) -> mx.array:
        return gelu_tanh(x)

    def softmax(self, x: mx.array) -> mx.array:
        return mx.softmax(x.astype(mx.float32), axis=-1, precise=True)

    def softcap(self, x: mx.array, cap: float) -> mx.array:
        return cap * mx.tanh(x.astype(mx.float32) / cap)

    def top_k(self, x: mx.array, k: int):
        ids = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]                  # the k largest, unordered
        values = mx.take_along_axis(x, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        return mx.take_along_axis(values, order, axis=-1), mx.take_along_axis(ids, order, axis=-1)

    def take(self, vector: mx.array, ids: mx.array) -> mx.array:
        return vector[ids]

    def concat(self, xs: Sequence[mx.array], axis: int) -> mx.array:
        return mx.concatenate(list(xs), axis=axis)

    def sum(self, x: mx.array, axis: int) -> mx.array:
        return mx.sum(x, axis=axis)

    # --- sampler ops --------------------------------------------------------------------------
    def argmax(self, x: mx.array) -> mx.array:
        return mx.argmax(x, axis=-1)

    def entropy(self, logits: mx.array) -> mx.array:
        return entropy(logits)

    def categorical(self, logits: mx.array, uniforms: mx.array) -> mx.array:
        return categorical(logits, uniforms.astype(mx.float32))

    def argsort(self, x: mx.array) -> mx.array:
        return mx.argsort(x)

    def cumsum(self, x: mx.array) -> mx.array:
        return mx.cumsum(x)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def all(self, x: mx.array) -> mx.array:
        return mx.all(x)

    def mean(self, x: mx.array) -> mx.array:
        return mx.mean(x)


def create(dtype: str = "bfloat16", **options: Any) -> MLXBackend:
    """Backend factory used by `portable_dg.backends.get_backend` (dtype: the activation dtype)."""
    if options:
        raise ConfigError(f"mlx backend: unknown option(s) {', '.join(sorted(options))}")
    return MLXBackend(dtype)
