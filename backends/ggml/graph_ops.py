"""The backend protocol over lazy arrays: each op adds ggml nodes to the current trace.

Products, norms, attention and elementwise float ops become ggml nodes; ops ggml lacks (the
sampler's integer, sorting and statistics work) take their operands' values and run on the eager
backend (numpy).  Products whose weight type ggml has no fast kernel for on this CPU take numpy's
BLAS between two graph segments (`GgmlBackend.blas_route`).
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Sequence

import numpy as np

import ggml

from portable_dg.backends.numpy import ATTENTION_SCORES, hidden_keys
from portable_dg.errors import ConfigError

from .engine import DeviceWeight
from .trace import Lazy, Trace, host, ne_of

# Soft-lookup tiles hold a multiple of this many vocabulary rows (ggml's tiled GEMM wants k % 8 == 0).
TILE_ROWS = 64


def key_of(x: Any) -> Any:
    """What identifies an operand on the tape: a tensor's address, a weight's name, a value."""
    if isinstance(x, Lazy):
        return ctypes.addressof(x.tensor.contents)
    if isinstance(x, DeviceWeight):
        return x.name
    if isinstance(x, np.ndarray):
        return ("array", x.shape, x.dtype.str)
    return x


class GraphOps:
    """The backend protocol over `Lazy` arrays (see `portable_dg.backend`).  Products, norms,
    attention and elementwise float ops become ggml nodes; ops ggml lacks take their operands'
    values and run on the eager backend (numpy)."""

    name = "ggml"
    compute_dtype = "float32"

    def __init__(self, backend: Any):
        self.eager = backend
        self.trace: Trace | None = None

    # --- plumbing ---------------------------------------------------------------------------------
    def op(self, name: str, operands: Sequence[Any], build: Callable[[Any], Any], ndim: int | Sequence[int],
           *params: Any) -> Any:
        """One graph op: `build(ctx)` makes its tensor(s) from the operands' tensors."""
        key = (name, tuple(key_of(x) for x in operands)) + params
        ndims = [ndim] if isinstance(ndim, int) else list(ndim)
        out = self.trace.node(key, lambda: build(self.trace.ctx), ndims)
        return out[0] if isinstance(ndim, int) else tuple(out)

    def lazy(self, x: Any) -> Lazy:
        """x as a Lazy array: numpy operands become inputs."""
        return x if isinstance(x, Lazy) else self.trace.input(np.asarray(x))

    def cont(self, x: Lazy) -> Lazy:
        return self.op("cont", [x], lambda ctx: ggml.ggml_cont(ctx, x.tensor), x.ndim)

    def rows(self, x: Lazy) -> Lazy:
        """x with contiguous memory (what ggml's unary ops and reshapes want)."""
        return x if ggml.ggml_is_contiguous(x.tensor) else self.cont(x)

    def reshape(self, x: Lazy, shape: Sequence[int]) -> Lazy:
        shape = tuple(int(n) for n in shape)
        if -1 in shape:
            known = int(np.prod([n for n in shape if n != -1], dtype=np.int64))
            shape = tuple(x.size // known if n == -1 else n for n in shape)
        if int(np.prod(shape, dtype=np.int64)) != x.size:
            raise ValueError(f"cannot reshape {list(x.shape)} into {list(shape)}")
        if shape == x.shape:
            return x
        x = self.rows(x)
        return self.op("reshape", [x], lambda ctx: ggml.ggml_reshape_4d(ctx, x.tensor, *ne_of(shape)), len(shape),
                       shape)

    def view(self, x: Lazy, shape: Sequence[int], strides: Sequence[int], offset: int) -> Lazy:
        """A view of x's memory with numpy shape/strides (bytes) starting `offset` bytes in."""
        shape, strides = list(shape), list(strides)
        if tuple(shape) == x.shape and tuple(strides) == x.strides and offset == 0:
            return x
        ne = ne_of(shape)
        nb = list(reversed(strides)) + [0] * (4 - len(strides))
        nb[0] = nb[0] if shape else x.dtype.itemsize
        for i in range(1, 4):
            if ne[i] == 1:                                     # unit dims: the contiguous stride
                nb[i] = nb[i - 1] * ne[i - 1]
        return self.op("view", [x], lambda ctx: ggml.ggml_view_4d(ctx, x.tensor, *ne, nb[1], nb[2], nb[3], offset),
                       len(shape), tuple(shape), tuple(nb), offset)

    def index(self, x: Lazy, key: Any) -> Lazy:
        """x[key]: basic indexing (ints, slices of step 1, None, ...) as a view; an int array
        (numpy or lazy) as a row gather along the first axis."""
        if isinstance(key, (np.ndarray, Lazy, list)):
            return self.gather_rows(x, key)
        key = key if isinstance(key, tuple) else (key,)
        explicit = sum(k is not None and k is not Ellipsis for k in key)
        if explicit > x.ndim:
            raise IndexError(f"too many indices for an array of shape {list(x.shape)}")
        shape, strides = x.shape, x.strides
        out_shape, out_strides, offset, axis = [], [], 0, 0
        for k in key:
            if k is Ellipsis:
                for _ in range(x.ndim - explicit):
                    out_shape.append(shape[axis])
                    out_strides.append(strides[axis])
                    axis += 1
            elif k is None:
                out_shape.append(1)
                out_strides.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(shape[axis])
                if step != 1:
                    return self.gather_rows_at(x, key)
                out_shape.append(max(0, stop - start))
                out_strides.append(strides[axis])
                offset += start * strides[axis]
                axis += 1
            else:
                i = int(k)
                if not -shape[axis] <= i < shape[axis]:
                    raise IndexError(f"index {i} is out of bounds for axis {axis} with size {shape[axis]}")
                offset += (i % shape[axis]) * strides[axis]
                axis += 1
        out_shape += shape[axis:]
        out_strides += strides[axis:]
        return self.view(x, out_shape, out_strides, offset)

    def gather_rows_at(self, x: Lazy, key: Any) -> Any:
        """Indexing ggml has no view for: on the value."""
        return np.asarray(x)[key]

    def gather_rows(self, x: Lazy, ids: Any) -> Lazy:
        """x[ids] along the first axis; ids a 1-D int array (numpy or lazy)."""
        n0, rest = x.shape[0], x.shape[1:]
        if not isinstance(ids, Lazy):
            ids = np.asarray(ids)
            if ids.size and (ids.min() < -n0 or ids.max() >= n0):
                raise IndexError(f"index out of bounds for axis 0 with size {n0}")
            ids = self.lazy(ids % n0)
        flat = self.reshape(x, (n0, int(np.prod(rest, dtype=np.int64))))
        picked = self.op("get_rows", [flat, ids], lambda ctx: ggml.ggml_get_rows(ctx, flat.tensor, ids.tensor), 2)
        return self.reshape(picked, (ids.shape[0], *rest))

    def binary(self, name: str, a: Any, b: Any) -> Any:
        """a (op) b with numpy broadcasting; a or b may be Python scalars or numpy arrays."""
        if any(isinstance(v, (np.ndarray, Lazy)) and np.dtype(v.dtype).kind in "iub" for v in (a, b)):
            return {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[name](host(a), host(b))
        if not isinstance(a, (Lazy, np.ndarray)):
            return self.scalar_left(name, float(a), self.lazy(b))
        if not isinstance(b, (Lazy, np.ndarray)):
            return self.scalar_right(name, self.lazy(a), float(b))
        a, b = self.lazy(a), self.lazy(b)
        shape = tuple(np.broadcast_shapes(a.shape, b.shape))
        if a.shape != shape:
            if name in ("add", "mul") and b.shape == shape:     # commutative: the full operand first
                a, b = b, a
            else:
                a = self.broadcast(a, shape)
        a = self.rows(a)
        if b.tensor.contents.nb[0] != 4:                       # ggml reads rows of src1 in place
            b = self.cont(b)
        fn = {"add": ggml.ggml_add, "sub": ggml.ggml_sub, "mul": ggml.ggml_mul, "div": ggml.ggml_div}[name]
        return self.op(name, [a, b], lambda ctx: fn(ctx, a.tensor, b.tensor), len(shape))

    def broadcast(self, x: Lazy, shape: Sequence[int]) -> Lazy:
        """x repeated to `shape`."""
        if x.shape == tuple(shape):
            return x
        x = self.rows(x)

        def build(ctx: Any) -> Any:
            template = ggml.ggml_new_tensor(ctx, x.tensor.contents.type, 4, (ctypes.c_int64 * 4)(*ne_of(shape)))
            return ggml.ggml_repeat(ctx, x.tensor, template)
        return self.op("repeat", [x], build, len(shape), tuple(shape))

    def scalar_right(self, name: str, x: Lazy, c: float) -> Lazy:
        """x (op) c."""
        scale, bias = {"add": (1.0, c), "sub": (1.0, -c), "mul": (c, 0.0), "div": (1.0 / c, 0.0)}[name]
        return self.affine(x, scale, bias)

    def scalar_left(self, name: str, c: float, x: Lazy) -> Any:
        """c (op) x."""
        if name == "div":
            return c / np.asarray(x)
        scale, bias = {"add": (1.0, c), "sub": (-1.0, c), "mul": (c, 0.0)}[name]
        return self.affine(x, scale, bias)

    def affine(self, x: Lazy, scale: float, bias: float) -> Lazy:
        """x * scale + bias."""
        x = self.rows(x)
        if bias == 0.0:
            return self.op("scale", [x], lambda ctx: ggml.ggml_scale(ctx, x.tensor, scale), x.ndim, scale)
        return self.op("scale_bias", [x], lambda ctx: ggml.ggml_scale_bias(ctx, x.tensor, scale, bias), x.ndim,
                       scale, bias)

    def unary(self, name: str, x: Any) -> Lazy:
        x = self.rows(self.lazy(x))
        fn = {"neg": ggml.ggml_neg, "tanh": ggml.ggml_tanh, "softmax": ggml.ggml_soft_max,
              "sum_rows": ggml.ggml_sum_rows}[name]
        return self.op(name, [x], lambda ctx: fn(ctx, x.tensor), x.ndim)

    # --- weights, host transfer ------------------------------------------------------------------
    def weight(self, name: str, value: Any) -> Any:
        return self.eager.weight(name, value)

    def asarray(self, a: np.ndarray, compute: bool = False) -> np.ndarray:
        return self.eager.asarray(a, compute)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(host(x))

    def zeros(self, shape: Sequence[int]) -> np.ndarray:
        return self.eager.zeros(shape)

    # --- products ---------------------------------------------------------------------------------
    def embedding(self, table: DeviceWeight, ids: Any) -> Lazy:
        if table.repacked:                           # rows come from the file's bytes (per-op path)
            return self.lazy(self.eager.embedding(table, host(ids)))
        shape = tuple(np.shape(ids)) if not isinstance(ids, Lazy) else ids.shape
        if isinstance(ids, Lazy):
            flat = self.reshape(ids, (ids.size,))
        else:
            flat = self.lazy(self.eager.check_ids(np.asarray(ids).reshape(-1), table.shape[0], table))
        rows = self.op("embedding", [table, flat], lambda ctx: ggml.ggml_get_rows(ctx, table.tensor, flat.tensor), 2)
        return self.reshape(rows, (*shape, table.shape[1]))

    def linear(self, x: Any, w: DeviceWeight) -> Lazy:
        x = self.lazy(x)
        if x.shape[-1] != w.shape[-1]:
            raise ConfigError(f"{w.name}: input has {x.shape[-1]} features, the weight "
                              f"{list(w.shape)} expects {w.shape[-1]}")
        lead = x.shape[:-1]
        rows = int(np.prod(lead, dtype=np.int64))
        if self.eager.blas_route(w, rows):                  # numpy's BLAS between two segments
            return self.eager.linear(host(x), w)
        x2 = self.reshape(x, (rows, w.shape[-1]))
        y = self.op("linear", [x2, w], lambda ctx: ggml.ggml_mul_mat(ctx, w.tensor, x2.tensor), 2)
        return self.reshape(y, (*lead, w.shape[0]))

    def expert_linear(self, x: Any, w: DeviceWeight, ids: Any) -> Lazy:
        E, out, n = w.shape
        T, k = ids.shape
        if self.eager.blas_route(w, T * k // E):               # numpy's BLAS per expert, between segments
            return self.eager.expert_linear(host(x), w, host(ids))
        x = self.lazy(x)
        if x.shape[-1] != n:
            raise ConfigError(f"{w.name}: input has {x.shape[-1]} features, the weight {list(w.shape)} expects {n}")
        ids = ids if isinstance(ids, Lazy) else self.lazy(self.eager.check_ids(np.asarray(ids), E, w))
        if x.shape[0] != T or (x.ndim == 3 and x.shape[1] != k):
            raise ConfigError(f"{w.name}: input {list(x.shape)} does not match ids {[T, k]}")
        b = self.reshape(x, (T, 1 if x.ndim == 2 else k, n))          # [T, 1 or k, in]
        ids = self.rows(ids)
        return self.op("expert_linear", [b, w, ids],
                       lambda ctx: ggml.ggml_mul_mat_id(ctx, w.tensor, b.tensor, ids.tensor), 3)

    def soft_embedding(self, logits: Any, table: DeviceWeight) -> Lazy:
        """softmax(logits) @ table: the table's rows dequantized tile by tile to float32 (ggml's row
        gather, which every device has for every type), each tile transposed and multiplied in
        ggml, the tiles' products summed (temporaries [rows, tile])."""
        from . import TILE_VALUES

        V, H = table.shape
        rows = int(np.prod(np.shape(logits)[:-1], dtype=np.int64))
        if table.repacked or self.eager.engine.is_cpu and rows >= self.eager.blas_min_tokens:
            return self.eager.soft_embedding(host(logits), table)        # numpy's BLAS over tiles
        x = self.lazy(logits)
        if x.shape[-1] != V:
            raise ConfigError(f"{table.name}: logits over {x.shape[-1]} tokens, the table has {V}")
        lead = x.shape[:-1]
        R = int(np.prod(lead, dtype=np.int64))
        flat = self.reshape(x, (R, V))
        step = max(TILE_ROWS, TILE_VALUES // H // TILE_ROWS * TILE_ROWS)
        spans = [(a, min(V, a + step)) for a in range(0, V, step)]
        ids = [self.trace.input(np.arange(a, b, dtype=np.int32), frame=True) for a, b in spans]   # constants

        def build(ctx: Any) -> Any:
            probs = ggml.ggml_soft_max(ctx, flat.tensor)                                   # ne [V, R]
            out = None
            for (start, stop), index in zip(spans, ids):
                tile = ggml.ggml_get_rows(ctx, table.tensor, index.tensor)                 # ne [H, n] F32
                tile_t = ggml.ggml_cont(ctx, ggml.ggml_transpose(ctx, tile))              # ne [n, H]
                p = ggml.ggml_cont(ctx, ggml.ggml_view_2d(ctx, probs, stop - start, R, probs.contents.nb[1],
                                                          start * 4))                     # ne [n, R]
                part = ggml.ggml_mul_mat(ctx, tile_t, p)                                   # ne [H, R]
                out = part if out is None else ggml.ggml_add(ctx, out, part)
            return out
        out = self.op("soft_embedding", [flat, table, *ids], build, 2)
        return self.reshape(out, (*lead, H))

    # --- elementwise, norms, attention ------------------------------------------------------------
    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        if not isinstance(x, Lazy) and not isinstance(w, Lazy):
            return self.eager.rms_norm(x, w, eps)
        x = self.rows(self.lazy(x))
        y = self.op("rms_norm", [x], lambda ctx: ggml.ggml_rms_norm(ctx, x.tensor, eps), x.ndim, eps)
        return y if w is None else y * w

    def rope(self, x: Any, cos: Any, sin: Any) -> Any:
        if not any(isinstance(a, Lazy) for a in (x, cos, sin)):
            return self.eager.rope(x, cos, sin)
        x = self.lazy(x)
        half = x.shape[-1] // 2
        rotated = self.concat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def attention(self, q: Any, k: Any, v: Any, *, causal_shift: int | None, window: int | None) -> Lazy:
        """Scores per query block of at most ATTENTION_SCORES entries (numpy's bound: queries x keys
        x heads); softmax in float32."""
        if not any(isinstance(a, Lazy) for a in (q, k, v)):
            return self.eager.attention(q, k, v, causal_shift=causal_shift, window=window)
        q, k, v = self.lazy(q), self.lazy(k), self.lazy(v)
        n, T, nq, d = q.shape
        S = k.shape[1]
        block = max(1, ATTENTION_SCORES // (n * nq * S))
        outs = []
        for start in range(0, T, block):
            stop = min(T, start + block)
            mask = None
            if causal_shift is not None:
                hidden = hidden_keys(np.arange(start, stop) + causal_shift, S, window)
                mask = self.lazy(np.where(hidden, -np.inf, 0.0).astype(np.float32))      # [t, S]
            outs.append(self.attention_block(q[:, start:stop], k, v, mask))
        return outs[0] if len(outs) == 1 else self.concat(outs, 1)

    def attention_block(self, q: Lazy, k: Lazy, v: Lazy, mask: Lazy | None) -> Lazy:
        """q [B, t, nq, d], k and v [B, S, nkv, d], mask [t, S] or None -> [B, t, nq, d]."""
        n, t, nq, d = q.shape
        operands = [q, k, v] + ([mask] if mask is not None else [])

        def build(ctx: Any) -> Any:
            qp = ggml.ggml_cont(ctx, ggml.ggml_permute(ctx, q.tensor, 0, 2, 1, 3))        # ne [d, t, nq, B]
            kp = ggml.ggml_cont(ctx, ggml.ggml_permute(ctx, k.tensor, 0, 2, 1, 3))        # ne [d, S, nkv, B]
            scores = ggml.ggml_mul_mat(ctx, kp, qp)                                        # ne [S, t, nq, B]
            probs = ggml.ggml_soft_max_ext(ctx, scores, mask.tensor if mask is not None else None, 1.0, 0.0)
            vt = ggml.ggml_cont(ctx, ggml.ggml_permute(ctx, v.tensor, 1, 2, 0, 3))        # ne [S, d, nkv, B]
            out = ggml.ggml_mul_mat(ctx, vt, probs)                                        # ne [d, t, nq, B]
            return ggml.ggml_cont(ctx, ggml.ggml_permute(ctx, out, 0, 2, 1, 3))           # ne [d, nq, t, B]
        return self.op("attention", operands, build, 4)

    def gelu_tanh(self, x: Any) -> Any:
        """The reference's operations in its order (ggml's own GELU reads a float16 table)."""
        if not isinstance(x, Lazy):
            return self.eager.gelu_tanh(x)
        x = self.rows(x)
        inner = x * 0.044715 * x * x + x
        inner = self.unary("tanh", inner * float(np.float32(np.sqrt(2.0 / np.pi))))
        return (inner + 1.0) * x * 0.5

    def softmax(self, x: Any) -> Any:
        return self.unary("softmax", x) if isinstance(x, Lazy) else self.eager.softmax(x)

    def softcap(self, x: Any, cap: float) -> Any:
        return self.unary("tanh", x / cap) * cap if isinstance(x, Lazy) else self.eager.softcap(x, cap)

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        """Descending, as the reference (which breaks exact ties by the lower index; ggml's sort
        does not promise that order for ties)."""
        if not isinstance(x, Lazy):
            return self.eager.top_k(x, k)
        x = self.rows(x)
        *lead, E = x.shape
        N = int(np.prod(lead, dtype=np.int64))

        def build(ctx: Any) -> tuple[Any, Any]:
            ids = ggml.ggml_cont(ctx, ggml.ggml_argsort_top_k(ctx, x.tensor, k))        # ne [k, ...]
            ids2 = ggml.ggml_reshape_2d(ctx, ids, k, N)
            values = ggml.ggml_get_rows(ctx, ggml.ggml_reshape_3d(ctx, x.tensor, 1, E, N), ids2)   # ne [1, k, N]
            return ggml.ggml_reshape_4d(ctx, values, *ne_of((*lead, k))), ids
        return self.op("top_k", [x], build, (x.ndim, x.ndim), k)

    def take(self, vector: Any, ids: Any) -> Any:
        if not isinstance(vector, Lazy):
            return self.eager.take(vector, host(ids))
        shape = ids.shape
        flat = self.reshape(self.lazy(ids), (int(np.prod(shape, dtype=np.int64)),))
        table = self.reshape(vector, (vector.shape[0], 1))
        return self.reshape(self.gather_rows(table, flat), shape)

    def concat(self, xs: Sequence[Any], axis: int) -> Any:
        if not any(isinstance(x, Lazy) for x in xs) or any(np.dtype(x.dtype).kind != "f" for x in xs):
            return self.eager.concat([host(x) for x in xs], axis)
        parts = [self.rows(self.lazy(x)) for x in xs]
        ndim = parts[0].ndim
        dim = ndim - 1 - (axis % ndim)
        out = parts[0]
        for p in parts[1:]:
            a = out
            out = self.op("concat", [a, p], lambda ctx, a=a, p=p: ggml.ggml_concat(ctx, a.tensor, p.tensor, dim),
                          ndim, dim)
        return out

    def sum(self, x: Any, axis: int) -> Any:
        if not isinstance(x, Lazy) or x.dtype.kind != "f":
            return self.eager.sum(host(x), axis)
        axis %= x.ndim
        shape = x.shape[:axis] + x.shape[axis + 1:]
        if axis == x.ndim - 1:
            return self.reshape(self.unary("sum_rows", x), shape)
        total = None                                             # short axes: one add per slice
        if x.shape[axis] <= 16:
            for i in range(x.shape[axis]):
                part = x[(slice(None),) * axis + (i,)]
                total = part if total is None else total + part
            return self.rows(total) if total is not None else total
        return self.eager.sum(host(x), axis)

    def to_float32(self, x: Any) -> Any:
        return x if isinstance(x, Lazy) and x.dtype.kind == "f" else self.eager.to_float32(host(x))

    def divide_rows(self, x: Any, t: Any) -> Any:
        if not isinstance(x, Lazy):
            return self.eager.divide_rows(x, host(t))
        t = np.asarray(host(t), np.float32).reshape(-1, *[1] * (x.ndim - 1))
        return x / t

    # --- ops ggml has no node for: on the values --------------------------------------------------
    def token_stats(self, logits: Any, uniforms: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.eager.token_stats(host(logits), host(uniforms))

    def take_along(self, x: Any, ids: Any) -> np.ndarray:
        return self.eager.take_along(host(x), host(ids))

    def argsort(self, x: Any) -> np.ndarray:
        return self.eager.argsort(host(x))

    def cumsum(self, x: Any) -> np.ndarray:
        return self.eager.cumsum(host(x))

    def where(self, cond: Any, a: Any, b: Any) -> np.ndarray:
        return self.eager.where(host(cond), host(a), host(b))

    def all(self, x: Any, axis: int) -> np.ndarray:
        return self.eager.all(host(x), axis)

    def mean(self, x: Any, axis: int) -> np.ndarray:
        return self.eager.mean(host(x), axis)
