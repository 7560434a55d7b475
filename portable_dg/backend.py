"""The backend protocol: the only thing the model and the sampler know about a compute backend.

`models/diffusion_gemma.py` (the model) and `portable_dg/sampler.py` (the block-diffusion loop) are
written once against this protocol; a backend supplies ops and weight storage, never model logic.

Arrays.  A backend's activation arrays (`Array`) support the Python operators `+ - * /` and unary
`-` with arrays of the same shape or broadcastable shapes and with Python scalars, `.shape`,
comparisons `< <= > >= ==`, `&` on bool arrays, `.shape`, `.reshape(*shape)` and basic slicing
(`x[..., a:b]`, `x[:, None]`) and indexing by an int array.  numpy, torch and mlx arrays all do.
Weights (`Weight`) are opaque: a backend may keep them quantized in its own format and
only hands them to `embedding`, `linear`, `expert_linear`, `soft_embedding` and `rms_norm`; small
vectors (norm weights, router scales, layer scalars) are plain `Array`s.

Shapes use T = tokens in a pass, S = key positions, H = hidden size, V = vocabulary,
E = experts, k = experts per token, n = heads, d = head dim.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

Array = Any
Weight = Any


@runtime_checkable
class Backend(Protocol):
    """Ops and weight storage for one compute device.  See the module docstring for `Array`."""

    name: str
    compute_dtype: str  # "float32", "float64", "bfloat16" or "float16": the activation dtype

    # --- weights and host transfer -------------------------------------------------------------
    def weight(self, name: str, value: Any) -> Weight:
        """Turn a checkpoint tensor into this backend's storage.

        `value` is a numpy array (any float dtype, possibly a read-only memory map) or a
        format-specific quantized tensor this backend understands; `name` is its canonical name
        (Hugging Face stored name, see `portable_dg.checkpoint`).  Vectors (ndim <= 1) must come
        back as plain `Array`s in the compute dtype."""
        ...

    def asarray(self, a: np.ndarray) -> Array:
        """Host -> device.  Floats become the compute dtype, or float32 where that is narrower
        (bf16 uniforms and self-conditioning logits would skew sampling); integers stay int64."""
        ...

    def to_numpy(self, x: Array) -> np.ndarray:
        """Device -> host (a host sync)."""
        ...

    # --- dense ops -------------------------------------------------------------------------------
    def embedding(self, table: Weight, ids: Array) -> Array:
        """Row gather: table [V, H], ids [T] int -> [T, H] (unscaled)."""
        ...

    def linear(self, x: Array, w: Weight) -> Array:
        """x [T, in] @ w[out, in].T -> [T, out].  `w` may be quantized."""
        ...

    def soft_embedding(self, probs: Array, table: Weight) -> Array:
        """probs [T, V] @ table [V, H] -> [T, H] (the self-conditioning soft lookup)."""
        ...

    def expert_linear(self, x: Array, w: Weight, ids: Array) -> Array:
        """Gather-matmul over stacked experts.

        x [T, in] (the same input for every selected expert) or [T, k, in]; w [E, out, in];
        ids [T, k] int -> [T, k, out] with out[t, j] = w[ids[t, j]] @ x[t(, j)]."""
        ...

    def rms_norm(self, x: Array, w: Array | None, eps: float) -> Array:
        """x * (mean(x^2, -1) + eps)^-1/2 * w over the last axis, in float32; w None = weightless."""
        ...

    def rope(self, x: Array, positions: np.ndarray, inv_freq: np.ndarray) -> Array:
        """Rotate-half RoPE.  x [T, n, d], positions [T] int (host), inv_freq [d/2] float32 (host).

        theta = p * f; cos/sin of [theta, theta]; x*cos + rotate_half(x)*sin with
        rotate_half([x1, x2]) = [-x2, x1] (halves).  A zero frequency leaves its pair unrotated."""
        ...

    def attention(self, q: Array, k: Array, v: Array, *, causal_shift: int | None,
                  window: int | None) -> Array:
        """Scaled-dot-product attention with scale 1.0 and GQA.

        q [T, nq, d], k and v [S, nkv, d] with nq a multiple of nkv (query head h reads kv head
        h // (nq // nkv)) -> [T, nq, d].  causal_shift None: every query sees every key.
        Otherwise query i sees key j iff j <= i + causal_shift and, when window is set,
        i + causal_shift - j < window.  Softmax in float32."""
        ...

    def gelu_tanh(self, x: Array) -> Array:
        """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
        ...

    def softmax(self, x: Array) -> Array:
        """Softmax over the last axis, computed in float32 (max-subtracted)."""
        ...

    def softcap(self, x: Array, cap: float) -> Array:
        """cap * tanh(x / cap), computed on float32 (or wider) values; returns float32 or wider."""
        ...

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        """The k largest entries of the last axis, descending: (values [.., k], indices [.., k])."""
        ...

    def take(self, vector: Array, ids: Array) -> Array:
        """vector [E] gathered at ids (any int shape) -> ids.shape."""
        ...

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        """Concatenate along axis."""
        ...

    def sum(self, x: Array, axis: int) -> Array:
        """Sum over one axis."""
        ...

    # --- sampler ops ---------------------------------------------------------------------------
    def argmax(self, x: Array) -> Array:
        """Index of the largest entry of the last axis (first on ties) -> int array."""
        ...

    def entropy(self, logits: Array) -> Array:
        """Entropy (natural log) of softmax(logits) over the last axis: [L, V] -> [L] float32."""
        ...

    def categorical(self, logits: Array, uniforms: Array) -> Array:
        """Inverse-CDF sample of softmax(logits) per row: [L, V], uniforms [L] in [0, 1) -> [L] int.

        The sample is the first index whose cumulative probability exceeds u * total."""
        ...

    def argsort(self, x: Array) -> Array:
        """Ascending stable argsort of a 1-D array -> int array."""
        ...

    def cumsum(self, x: Array) -> Array:
        """Inclusive cumulative sum of a 1-D array."""
        ...

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        """Elementwise select."""
        ...

    def all(self, x: Array) -> Array:
        """Logical and over every element -> a 0-d bool array (no host sync)."""
        ...

    def mean(self, x: Array) -> Array:
        """Mean over every element -> a 0-d float array (no host sync)."""
        ...
