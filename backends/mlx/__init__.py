"""The MLX backend: Apple Silicon (Metal); on Linux `mlx[cpu]` runs it for tests only.

Fast paths: `mx.fast.rms_norm`, `mx.fast.scaled_dot_product_attention` (scale 1.0, native GQA, a
boolean mask for the encoder), `mx.quantized_matmul` / `mx.gather_qmm` on weights kept packed as
`mx.quantize` made them (affine 2-8 bits, mxfp4), and `mx.gather_mm` over stacked experts with the
tokens sorted by expert for a whole canvas.  The whole denoising step (decoder pass and sampler) is
`mx.compile`d through the step hook, once per batch change (`compile_step`).

MLX is lazy: nothing runs until a host read.  The engine reads each step's result once, which
evaluates the step's whole graph; on steps it does not read, the new state is evaluated explicitly
so graphs never grow across steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from portable_dg.converters.mlx import MLXQuantized
from portable_dg.errors import ConfigError

import mlx.core as mx

FORMATS = ("hf", "mlx")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
SORT_THRESHOLD = 64   # expert rows at or above which tokens are sorted by expert (as mlx-lm does)
ROW_CHUNK = 1 << 24   # elements of a [rows, V] temporary the sampler ops and the soft lookup make at once
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
def argmax_entropy(logits: mx.array) -> tuple[mx.array, mx.array]:
    z = logits - mx.max(logits, axis=-1, keepdims=True)
    e = mx.exp(z)
    total = mx.sum(e, axis=-1)
    return mx.argmax(logits, axis=-1), mx.log(total) - mx.sum(e * z, axis=-1) / total


@mx.compile
def categorical(logits: mx.array, uniforms: mx.array) -> mx.array:
    cdf = mx.cumsum(mx.exp(logits - mx.max(logits, axis=-1, keepdims=True)), axis=-1)  # [R, V]
    target = uniforms[:, None] * cdf[:, -1:]
    return mx.minimum(mx.sum(cdf <= target, axis=-1), logits.shape[-1] - 1)


def attention_mask(T: int, S: int, causal_shift: int, window: int | None,
                   groups: mx.array | None = None) -> mx.array:
    """[T, S] bool, True where query i may read key j (j <= i + shift, within the window); with
    groups [B, T], [B, 1, T, S] where also the queries' own tokens of one group >= 0 see each other."""
    query = mx.arange(T)[:, None] + causal_shift
    key = mx.arange(S)[None, :]
    visible = key <= query
    visible = visible if window is None else visible & (query - key < window)
    if groups is None:
        return visible
    keys = mx.concatenate([mx.full((groups.shape[0], S - T), -1, groups.dtype), groups], axis=1)   # [B, S]
    same = (groups[:, :, None] == keys[:, None, :]) & (groups[:, :, None] >= 0)
    return (visible[None] | same)[:, None]


class MLXBackend:
    """Implements `portable_dg.backend.Backend` with MLX."""

    name = "mlx"

    def __init__(self, dtype: str = "bfloat16", compile: bool | None = None):
        if dtype not in DTYPES:
            raise ConfigError(f"mlx backend: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.compute_dtype = dtype
        self.dtype = DTYPES[dtype]
        # mx.compile by default on the GPU (Metal); on the CPU it JIT-builds C++ kernels for seconds
        self.compile = mx.default_device() == mx.gpu if compile is None else compile

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
        if getattr(value, "qtype", None) == "bf16":
            array = mx.array(value.bits).view(mx.bfloat16)      # no float32 copy on the host
        else:
            if hasattr(value, "dequantize"):   # another format's quantized tensor (GGUF, ...)
                value = value.dequantize()
            array = mx.array(np.asarray(value, np.float32))
        # float experts [E, out, in] stay float32 on the CPU, whose gather_mm kernel is float32 only
        cpu_experts = array.ndim == 3 and mx.default_device().type == mx.cpu
        array = array.astype(mx.float32 if cpu_experts else self.dtype)
        mx.eval(array)
        return array

    def asarray(self, a: np.ndarray, compute: bool = False) -> mx.array:
        a = np.asarray(a)
        if a.dtype == np.bool_:
            return mx.array(a)
        if a.dtype.kind in "iu":
            return mx.array(a.astype(np.int64))
        # host floats other than activations (self-conditioning logits) stay float32
        return mx.array(a, mx.float32).astype(self.dtype) if compute else mx.array(a, mx.float32)

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32) if x.dtype in (mx.bfloat16, mx.float16) else x)

    def zeros(self, shape) -> mx.array:
        return mx.zeros(tuple(shape), self.dtype)

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

    def soft_embedding(self, logits: mx.array, table) -> mx.array:
        flat = logits.reshape(-1, logits.shape[-1])                               # [R, V]
        step = max(1, ROW_CHUNK // flat.shape[-1])
        parts = []
        for start in range(0, flat.shape[0], step):
            probs = self.softmax(flat[start:start + step]).astype(self.dtype)
            if isinstance(table, QuantizedWeight):       # probs [r, V] x packed [V, H], no dequantized copy
                parts.append(mx.quantized_matmul(probs, table.weight, table.scales, table.biases,
                                                 transpose=False, **table.params))
            else:
                parts.append(probs @ table)
        return mx.concatenate(parts).reshape(*logits.shape[:-1], -1)

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

    def rope(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q, k, v, *, causal_shift, window, groups=None):
        T, S = q.shape[1], k.shape[1]
        mask = None if causal_shift is None else attention_mask(T, S, causal_shift, window, groups)
        out = mx.fast.scaled_dot_product_attention(
            q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),             # [B, n, T|S, d]
            scale=1.0, mask=mask)
        return out.swapaxes(1, 2)                                             # [B, T, nq, d]

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

    def take_along(self, x: mx.array, ids: mx.array) -> mx.array:
        return mx.take_along_axis(x, ids, axis=-1)

    def concat(self, xs: Sequence[mx.array], axis: int) -> mx.array:
        return mx.concatenate(list(xs), axis=axis)

    def sum(self, x: mx.array, axis: int) -> mx.array:
        return mx.sum(x, axis=axis)

    def to_float32(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32)

    def to_compute(self, x: mx.array) -> mx.array:
        return x.astype(self.dtype)

    # --- sampler ops --------------------------------------------------------------------------
    def divide_rows(self, x: mx.array, t: mx.array) -> mx.array:
        return x / t.reshape(-1, *[1] * (x.ndim - 1))

    def token_stats(self, logits: mx.array, uniforms: mx.array | None):
        flat = logits.reshape(-1, logits.shape[-1])                               # [R, V]
        u = None if uniforms is None else uniforms.reshape(-1).astype(mx.float32)
        step = max(1, ROW_CHUNK // flat.shape[-1])
        argmaxes, entropies, samples = [], [], []
        for start in range(0, flat.shape[0], step):
            rows = flat[start:start + step]
            argmax, entropy = argmax_entropy(rows)
            argmaxes.append(argmax)
            entropies.append(entropy)
            samples.append(argmax if u is None else categorical(rows, u[start:start + step]))
        return tuple(mx.concatenate(parts).reshape(logits.shape[:-1]) for parts in (argmaxes, entropies, samples))

    def argsort(self, x: mx.array) -> mx.array:
        return mx.argsort(x, axis=-1)

    def cumsum(self, x: mx.array) -> mx.array:
        return mx.cumsum(x, axis=-1)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def all(self, x: mx.array, axis: int) -> mx.array:
        return mx.all(x, axis=axis)

    def mean(self, x: mx.array, axis: int) -> mx.array:
        return mx.mean(x.astype(mx.float32), axis=axis)

    def compile_step(self, fn: Callable[..., Any]) -> "CompiledStep":
        """The denoising step through `mx.compile` (traced once per batch change) when compiling,
        else eagerly; either way each step's outputs are evaluated before the next."""
        return CompiledStep(fn, self.compile)


class CompiledStep:
    """`fn(network, frame, state, knobs)` as an `mx.compile`d function of the arrays that change
    from step to step (canvas, soft embedding, history, step counters, host noise).  The frame
    (cache views, rotary tables) and the batch's static knobs are constants of the trace, which is
    redone whenever the frame changes (its serial number) or an input appears or disappears."""

    def __init__(self, fn: Callable[..., Any], compile: bool = True):
        self.fn = fn
        self.wrap = mx.compile if compile else (lambda f: f)
        self.key: tuple | None = None
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, network: Any, frame: Any, state: Any, knobs: Any) -> Any:
        from portable_dg.sampler import StepResult, StepState

        dynamic = [state.canvas, state.soft, state.history, knobs.steps_left, knobs.step, knobs.host_noise]
        present = tuple(x is not None for x in dynamic)
        key = (frame.serial, knobs.condition, present)
        if key != self.key:
            def run(*arrays: mx.array) -> list[mx.array]:
                it = iter(arrays)
                canvas, soft, history, steps_left, step, host_noise = (next(it) if p else None for p in present)
                result = self.fn(network, frame, StepState(canvas, soft, history), dataclasses.replace(
                    knobs, steps_left=steps_left, step=step, host_noise=host_noise))
                out = [result.state.canvas, result.state.history, result.argmax, result.stop, result.accepted,
                       result.mean_entropy]
                return out if result.state.soft is None else out + [result.state.soft]
            self.compiled, self.key = self.wrap(run), key
        out = self.compiled(*[x for x in dynamic if x is not None])
        mx.async_eval(out)                      # evaluate every step: graphs never grow across steps
        soft = out[6] if len(out) > 6 else None
        return StepResult(StepState(out[0], soft, out[1]), out[2], out[3], out[4], out[5])


def create(dtype: str = "bfloat16", compile: bool | None = None, **options: Any) -> MLXBackend:
    """Backend factory used by `portable_dg.backends.get_backend`.

    dtype: the activation dtype; compile: `mx.compile` the denoising step (default: on the GPU)."""
    if options:
        raise ConfigError(f"mlx backend: unknown option(s) {', '.join(sorted(options))}")
    return MLXBackend(dtype, compile)
