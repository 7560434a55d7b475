"""The backend protocol: the only thing the model and the sampler know about a compute backend.

`models/diffusion_gemma.py` (the model) and `portable_dg/sampler.py` (the block-diffusion step) are
written once against this protocol; a backend supplies ops and weight storage, never model logic.

Two levels.  The ops below are the portable floor: a backend that implements them runs the model
and the sampler unchanged.  On top of them a backend may offer `compile_step(fn)`: the engine hands
it the whole denoising step (the decoder pass plus the sampler's per-step work, a pure function of
device arrays) and calls what it returns instead; a backend traces or captures it there (a CUDA
graph, `torch.compile`, `mx.compile`, one ggml graph per pass).  Without it the step runs op by op.

Arrays.  A backend's activation arrays (`Array`) support the Python operators `+ - * /` and unary
`-` with broadcastable arrays and Python scalars; on integer arrays also `^ & >>` (the sampler's
counter-based random numbers); comparisons `< <= > >= ==`, `&` and `|` on bool arrays; `.shape`,
`.reshape(*shape)`, basic slicing (`x[..., a:b]`, `x[:, None]`, `x[b]`), indexing by an int array,
and item assignment to a basic slice (`x[r, a:b] = y`, in place: the KV cache is written this way).
numpy, torch and mlx arrays all do.  Weights (`Weight`) are opaque: a backend may keep them
quantized in its own format and only hands them to `embedding`, `linear`, `expert_linear`,
`soft_embedding` and `rms_norm`; small vectors (norm weights, router scales, layer scalars) are
plain `Array`s.

Shapes use B = sequences in a batch, T = tokens per sequence in a pass, S = key positions, H = hidden
size, V = vocabulary, E = experts, k = experts per token, n = heads, d = head dim.  "..." means any
leading batch axes.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

Array = Any
Weight = Any


@runtime_checkable
class Backend(Protocol):
    """Ops and weight storage for one compute device.  See the module docstring for `Array`."""

    name: str
    compute_dtype: str  # "float32", "float64", "bfloat16" or "float16": the activation dtype

    # --- weights, host transfer, allocation ----------------------------------------------------
    def weight(self, name: str, value: Any) -> Weight:
        """Turn a checkpoint tensor into this backend's storage.

        `value` is a numpy array (any float dtype, possibly a read-only memory map) or a
        format-specific quantized tensor this backend understands; `name` is its canonical name
        (Hugging Face stored name, see `portable_dg.checkpoint`).  Vectors (ndim <= 1) must come
        back as plain `Array`s in the compute dtype."""
        ...

    def asarray(self, a: np.ndarray, compute: bool = False) -> Array:
        """Host -> device.  Integers and bools keep their kind (ints as int64).  Floats become
        float32, or the compute dtype when `compute` (activations such as rotary tables)."""
        ...

    def to_numpy(self, x: Array) -> np.ndarray:
        """Device -> host (a host sync)."""
        ...

    def zeros(self, shape: Sequence[int]) -> Array:
        """A new array of zeros in the compute dtype (KV cache storage)."""
        ...

    # --- dense ops -------------------------------------------------------------------------------
    def embedding(self, table: Weight, ids: Array) -> Array:
        """Row gather: table [V, H], ids [...] int -> [..., H] (unscaled)."""
        ...

    def linear(self, x: Array, w: Weight) -> Array:
        """x [..., in] @ w[out, in].T -> [..., out].  `w` may be quantized."""
        ...

    def soft_embedding(self, logits: Array, table: Weight) -> Array:
        """softmax(logits) @ table: logits [..., V] float32, table [V, H] -> [..., H].

        The self-conditioning soft lookup: softmax in float32, the probabilities cast to the
        compute dtype before the product.  A backend bounds its temporaries (e.g. row chunks)."""
        ...

    def expert_linear(self, x: Array, w: Weight, ids: Array) -> Array:
        """Gather-matmul over stacked experts.

        x [N, in] (the same input for every selected expert) or [N, k, in]; w [E, out, in];
        ids [N, k] int -> [N, k, out] with out[t, j] = w[ids[t, j]] @ x[t(, j)]."""
        ...

    def rms_norm(self, x: Array, w: Array | None, eps: float) -> Array:
        """x * (mean(x^2, -1) + eps)^-1/2 * w over the last axis, in float32; w None = weightless."""
        ...

    def rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate-half RoPE: x [..., T, n, d], cos/sin [..., T, 1, d] in the compute dtype.

        x*cos + rotate_half(x)*sin with rotate_half([x1, x2]) = [-x2, x1] (halves)."""
        ...

    def attention(self, q: Array, k: Array, v: Array, *, causal_shift: int | None,
                  window: int | None, groups: Array | None = None) -> Array:
        """Scaled-dot-product attention, scale 1.0, GQA, over a batch of sequences that share S.

        q [B, T, nq, d], k and v [B, S, nkv, d] with nq a multiple of nkv (query head h reads kv
        head h // (nq // nkv)) -> [B, T, nq, d].  causal_shift None: every query sees every key.
        Otherwise query i sees key j iff j <= i + causal_shift and, when window is set,
        i + causal_shift - j < window; and also, when groups [B, T] int is given, iff key j is
        one of the queries' own tokens (the last T keys: j = S - T + i') with groups[b, i'] ==
        groups[b, i] >= 0 (an image's tokens see each other, whatever the causal and window
        rules say).  Softmax in float32."""
        ...

    def gelu_tanh(self, x: Array) -> Array:
        """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
        ...

    def softmax(self, x: Array) -> Array:
        """Softmax over the last axis, computed in float32 (max-subtracted)."""
        ...

    def softcap(self, x: Array, cap: float) -> Array:
        """cap * tanh(x / cap), computed on float32 (or wider) values; returns float32 or wider.
        May reuse x's memory (the model passes a temporary)."""
        ...

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        """The k largest entries of the last axis, descending: (values [.., k], indices [.., k])."""
        ...

    def take(self, vector: Array, ids: Array) -> Array:
        """vector [E] gathered at ids (any int shape) -> ids.shape."""
        ...

    def take_along(self, x: Array, ids: Array) -> Array:
        """x [..., n] gathered along the last axis at ids [..., m] int -> [..., m]."""
        ...

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        """Concatenate along axis."""
        ...

    def sum(self, x: Array, axis: int) -> Array:
        """Sum over one axis."""
        ...

    def to_float32(self, x: Array) -> Array:
        """Cast (integers included) to float32."""
        ...

    def to_compute(self, x: Array) -> Array:
        """Cast a float array to the compute dtype."""
        ...

    # --- sampler ops ---------------------------------------------------------------------------
    def divide_rows(self, x: Array, t: Array) -> Array:
        """x [B, ..., V] float32 / t [B] float32, row by row.  May reuse x's memory: the caller
        gives up x."""
        ...

    def token_stats(self, logits: Array, uniforms: Array | None) -> tuple[Array, Array, Array]:
        """Per row of logits [..., V] float32: (argmax [...], entropy [...] float32 (natural log) of
        softmax, sample [...]).  argmax takes the first index on ties.  The sample is the first
        index whose cumulative probability exceeds u * total for uniforms [...] in [0, 1); with
        uniforms None it is the argmax.  Temporaries stay small (fused, or row chunks)."""
        ...

    def argsort(self, x: Array) -> Array:
        """Ascending stable argsort along the last axis -> int array."""
        ...

    def cumsum(self, x: Array) -> Array:
        """Inclusive cumulative sum along the last axis."""
        ...

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        """Elementwise select (broadcasting; a or b may be Python scalars)."""
        ...

    def all(self, x: Array, axis: int) -> Array:
        """Logical and over one axis (no host sync)."""
        ...

    def mean(self, x: Array, axis: int) -> Array:
        """Mean over one axis, float32 (no host sync)."""
        ...


def compile_step(backend: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as the backend wants to run it: its `compile_step` hook when it has one, else as is."""
    hook = getattr(backend, "compile_step", None)
    return fn if hook is None else hook(fn)
