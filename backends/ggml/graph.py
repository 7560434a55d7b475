"""The denoising step as whole ggml graphs: traced once per shape, replayed every step.

`GgmlBackend.compile_step(fn)` returns a `GraphStep`.  It runs `fn` (the decoder pass plus the
sampler's step, `portable_dg.sampler.denoise_step`: the model and the sampler, unchanged) on
`GraphOps`, a backend whose arrays are `Lazy`: each op adds ggml nodes instead of computing.  A lazy
array becomes a numpy array when something needs its value: an op ggml has no node for (the
sampler's integer and sorting work, its token statistics, which must match the numpy reference
exactly) or the step's results.  Then every lazy array still referenced from Python is computed in
one ggml graph (a *segment*) on ggml's thread pool, the step goes on in numpy, and the next ggml
op starts the next segment.  A step is two segments: the decoder pass, the tied head, soft-capping
and the temperature ([B, L, V] scaled logits, read by the token statistics), then the
self-conditioning soft embedding of those logits.

Replay.  The graph ops of a step and their operands are recorded on a tape.  The next step runs
`fn` again (its numpy work is small), but each graph op takes its node from the tape, numpy
operands are copied into the recorded input tensors, and each segment's graph, allocated once, is
computed again.  An op that does not match the tape (another shape, another branch) discards the
trace and the step is recorded afresh.  The frame's arrays (rotary tables, context keys and values)
are inputs copied only when the frame changes (its serial number), so one trace serves every step
of a canvas and every later canvas with the same shapes; a canvas's first step (no
self-conditioning yet) runs on zeros, which the model turns into exactly the unconditioned input.
"""

from __future__ import annotations

import ctypes
import dataclasses
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

import ggml

from portable_dg.errors import ConfigError

from .engine import DeviceWeight

F32, I32 = ggml.GGML_TYPE_F32, ggml.GGML_TYPE_I32
# Traces a backend keeps (the most recently used): one per step shape, e.g. per canvas of a generation.
TRACE_CACHE = 4
# Tensors one trace may hold (a released-width step makes a few thousand).
TRACE_TENSORS = 1 << 16
# Soft-lookup tiles hold a multiple of this many vocabulary rows (ggml's tiled GEMM wants k % 8 == 0).
TILE_ROWS = 64
# Attention scores (queries x keys x heads) one graph node may hold: longer contexts take query blocks.
ATTENTION_SCORES = 1 << 24


def free_allocators(allocators: list[Any]) -> None:
    """Free a trace's graph allocators (and the memory of their graphs)."""
    for allocator in allocators:
        ggml.ggml_gallocr_free(allocator)


def free_buffers(buffers: list[Any]) -> None:
    """Free backend buffers."""
    for buffer in buffers:
        ggml.ggml_backend_buffer_free(buffer)


class Diverged(Exception):
    """A replayed step asked for an op the tape does not hold."""


def ne_of(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """ggml's ne (fastest first, padded with 1s) of a numpy shape."""
    if len(shape) > 4:
        raise ValueError(f"ggml tensors have at most 4 dimensions, got shape {list(shape)}")
    ne = list(reversed([int(n) for n in shape])) + [1] * (4 - len(shape))
    return ne[0], ne[1], ne[2], ne[3]


class Lazy:
    """An array of a traced step: a ggml tensor (dims reversed) standing for `ndim` numpy dims."""

    __array_ufunc__ = None          # numpy defers its operators to ours: array * lazy -> Lazy.__rmul__
    __slots__ = ("trace", "tensor", "ndim", "__weakref__")

    def __init__(self, trace: "Trace", tensor: Any, ndim: int):
        self.trace, self.tensor, self.ndim = trace, tensor, ndim

    @property
    def shape(self) -> tuple[int, ...]:
        ne = self.tensor.contents.ne
        return tuple(int(ne[i]) for i in reversed(range(self.ndim)))

    @property
    def strides(self) -> tuple[int, ...]:
        """numpy strides in bytes."""
        nb = self.tensor.contents.nb
        return tuple(int(nb[i]) for i in reversed(range(self.ndim)))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int64 if self.tensor.contents.type == I32 else np.float32)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape: Any) -> "Lazy":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self.trace.ops.reshape(self, shape)

    def __getitem__(self, key: Any) -> "Lazy":
        return self.trace.ops.index(self, key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = self.trace.value(self)
        return value if dtype is None else value.astype(dtype)

    # arithmetic adds nodes; integer and logical operators run in numpy on the value
    def __add__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("add", self, other)

    def __radd__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("add", other, self)

    def __sub__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("sub", self, other)

    def __rsub__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("sub", other, self)

    def __mul__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("mul", self, other)

    def __rmul__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("mul", other, self)

    def __truediv__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("div", self, other)

    def __rtruediv__(self, other: Any) -> "Lazy":
        return self.trace.ops.binary("div", other, self)

    def __neg__(self) -> "Lazy":
        return self.trace.ops.unary("neg", self)

    def __lt__(self, other: Any) -> np.ndarray:
        return np.asarray(self) < host(other)

    def __le__(self, other: Any) -> np.ndarray:
        return np.asarray(self) <= host(other)

    def __gt__(self, other: Any) -> np.ndarray:
        return np.asarray(self) > host(other)

    def __ge__(self, other: Any) -> np.ndarray:
        return np.asarray(self) >= host(other)

    def __eq__(self, other: Any) -> np.ndarray:      # type: ignore[override]
        return np.asarray(self) == host(other)

    def __and__(self, other: Any) -> np.ndarray:
        return np.asarray(self) & host(other)

    def __or__(self, other: Any) -> np.ndarray:
        return np.asarray(self) | host(other)

    def __xor__(self, other: Any) -> np.ndarray:
        return np.asarray(self) ^ host(other)

    def __rshift__(self, other: Any) -> np.ndarray:
        return np.asarray(self) >> host(other)

    __hash__ = None                  # type: ignore[assignment]


def host(x: Any) -> Any:
    """A Lazy array's value (numpy); anything else as it is."""
    return np.asarray(x) if isinstance(x, Lazy) else x


class Segment:
    """One graph of a trace (while recording: a graph of its own; once planned: a range of the
    trace's whole graph), the tensors it leaves valid (its outputs), and the leaf tensors later
    segments read those outputs through (tensor address -> alias)."""

    def __init__(self, graph: Any, outputs: dict[int, Any], aliases: dict[int, Any]):
        self.graph, self.outputs, self.aliases = graph, outputs, aliases


class Trace:
    """The ggml graphs of one step shape: a context holding every node, the tape of graph ops in
    call order, and the segments computed so far.  Recording builds them; replaying reuses them."""

    def __init__(self, engine: Any, ops: "GraphOps"):
        self.engine, self.ops = engine, ops
        self.allocators: list[Any] = []  # the graphs' memory: one per segment while recording, then one
        weakref.finalize(self, free_allocators, self.allocators)
        self.buffers: list[Any] = []     # while recording: the copies of values that cross segments
        weakref.finalize(self, free_buffers, self.buffers)
        self.carried: set[int] = set()   # addresses of those copies
        self.produced: dict[int, int] = {}   # output (or alias) address -> index of its segment
        self.late: set[int] = set()      # outputs read after a later segment ran (kept apart when planned)
        self.whole: Any = None           # the planned graph of every segment, in order
        self.frame_serial: int | None = None
        self.ctx = self.context(ggml.ggml_tensor_overhead() * TRACE_TENSORS)
        self.tape: list[tuple[tuple, tuple[Any, ...]]] = []
        self.segments: list[Segment] = []
        self.recording = True
        self.cursor = 0                  # next tape entry (replay)
        self.segment_cursor = 0          # next segment to compute (replay)
        self.live: list[weakref.ref] = []   # Lazy arrays made since the last segment
        self.ready: set[int] = set()     # tensors whose values are valid in this step
        self.pending: list[tuple[Any, np.ndarray]] = []   # inputs to copy before the next compute
        self.upload_frame = True         # copy frame inputs in this step
        self.builds = 0                  # segment graphs built (tests: built once per shape)

    def context(self, size: int) -> Any:
        """A ggml context of `size` bytes for tensor and graph descriptors, freed with the trace."""
        ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
        weakref.finalize(self, ggml.ggml_free, ctx)
        return ctx

    def start(self, frame_serial: int) -> None:
        """Begin a step of the frame with this serial: replay from the start of the tape."""
        self.recording = not self.tape and not self.segments
        self.cursor = self.segment_cursor = 0
        self.ready.clear()
        self.live.clear()
        self.pending.clear()
        self.upload_frame = frame_serial != self.frame_serial or self.recording
        self.frame_serial = frame_serial

    # --- nodes ------------------------------------------------------------------------------------
    def node(self, key: tuple, build: Callable[[], Any], ndims: Sequence[int]) -> list[Lazy]:
        """The tensors of one graph op: built when recording, taken from the tape when replaying."""
        if self.recording:
            tensors = build()
            tensors = tensors if isinstance(tensors, tuple) else (tensors,)
            self.tape.append((key, tensors))
        else:
            if self.cursor >= len(self.tape) or self.tape[self.cursor][0] != key:
                raise Diverged(key[0])
            tensors = self.tape[self.cursor][1]
            self.cursor += 1
        return [self.wrap(t, n) for t, n in zip(tensors, ndims)]

    def wrap(self, tensor: Any, ndim: int) -> Lazy:
        out = Lazy(self, tensor, ndim)
        self.live.append(weakref.ref(out))
        return out

    def input(self, array: np.ndarray, frame: bool = False) -> Lazy:
        """A numpy array as a graph input (float32 or int32), copied before the next compute; frame
        inputs are copied only when the frame changed and stay valid across steps."""
        array = np.ascontiguousarray(array, np.int32 if array.dtype.kind in "iub" else np.float32)
        kind = I32 if array.dtype == np.int32 else F32

        def build() -> Any:
            t = ggml.ggml_new_tensor(self.ctx, kind, max(1, array.ndim), (ctypes.c_int64 * 4)(*ne_of(array.shape)))
            ggml.ggml_set_input(t)
            if frame:
                ggml.ggml_set_output(t)          # never reused for other values: kept across steps
            return t

        (lazy,) = self.node(("input", array.shape, kind, frame), build, [array.ndim])
        if not frame or self.upload_frame:
            self.pending.append((lazy.tensor, array))
        return lazy

    # --- values -----------------------------------------------------------------------------------
    def value(self, x: Lazy) -> np.ndarray:
        """The numpy value of a lazy array (computing its segment when needed)."""
        if not ggml.ggml_is_contiguous(x.tensor):
            x = self.ops.cont(x)
        address = ctypes.addressof(x.tensor.contents)
        if address not in self.ready:
            self.run_segment(address)
        elif self.produced.get(address, self.segment_cursor - 1) < self.segment_cursor - 1:
            self.late.add(address)
        out = self.engine.read(x.tensor, x.shape, np.int32 if x.dtype.kind == "i" else np.float32)
        return out.astype(np.int64) if out.dtype == np.int32 else out.copy()

    def run_segment(self, wanted: int) -> None:
        """Compute the segment that makes tensor `wanted`: recording, the graph of every lazy array
        still referenced; replaying, the next recorded segment.  Afterwards the referenced arrays
        read their values through leaf aliases, so that later graphs do not compute them again
        (recording: copies in buffers of their own, and the segment's memory is freed)."""
        live = [x for x in (ref() for ref in self.live) if x is not None]
        self.live.clear()
        if self.recording:
            self.segments.append(self.build_segment(live))
        if self.segment_cursor >= len(self.segments) or wanted not in self.segments[self.segment_cursor].outputs:
            raise Diverged("segment")
        segment = self.segments[self.segment_cursor]
        self.flush()
        self.engine.compute(segment.graph)
        self.ready |= segment.outputs.keys()
        if self.recording:
            self.carry(segment, live)
        for x in live:
            alias = segment.aliases.get(ctypes.addressof(x.tensor.contents))
            if alias is not None:
                x.tensor = alias
                self.ready.add(ctypes.addressof(alias.contents))
        if self.recording:
            for address in segment.outputs.keys() | {ctypes.addressof(a.contents) for a in segment.aliases.values()}:
                self.produced.setdefault(address, self.segment_cursor)
        self.segment_cursor += 1

    def build_segment(self, live: list[Lazy]) -> Segment:
        """A graph whose outputs are the live lazy arrays (and the tensors their views read), in
        memory of its own until `carry` copies them out."""
        outputs: dict[int, Any] = {}
        for x in live:
            t = x.tensor
            while t:
                outputs.setdefault(ctypes.addressof(t.contents), t)
                t = t.contents.view_src
        # a graph holds at most the trace's tensors so far plus leaves from elsewhere (weights)
        size = ggml.ggml_used_mem(self.ctx) // ggml.ggml_tensor_overhead() + 2 * len(outputs) + 4096
        graph = ggml.ggml_new_graph_custom(self.context(ggml.ggml_graph_overhead_custom(size, False)), size, False)
        for t in outputs.values():
            ggml.ggml_set_output(t)
            ggml.ggml_build_forward_expand(graph, t)
        allocator = ggml.ggml_gallocr_new(self.engine.buffer_type)
        self.allocators.append(allocator)
        if not ggml.ggml_gallocr_alloc_graph(allocator, graph):
            raise RuntimeError("ggml could not allocate the step's graph")
        self.builds += 1
        return Segment(graph, outputs, {})

    def carry(self, segment: Segment, live: list[Lazy]) -> None:
        """Recording: the live arrays the segment's memory holds as leaf tensors (the segment's
        aliases).  On the CPU they are copies in buffers of their own and the segment's memory is
        freed; on other devices they stay where they are until `plan` (freeing a Vulkan buffer
        between graphs corrupted memory on lavapipe)."""
        copy = self.engine.is_cpu
        for x in live:
            t = x.tensor
            address = ctypes.addressof(t.contents)
            if address in segment.aliases or address in self.carried or not t.contents.data:
                continue
            leaf = ggml.ggml_new_tensor(self.ctx, t.contents.type, 4, t.contents.ne)
            for i in range(4):
                leaf.contents.nb[i] = t.contents.nb[i]
            if copy:
                buffer = ggml.ggml_backend_buft_alloc_buffer(self.engine.buffer_type, ggml.ggml_nbytes(t))
                self.buffers.append(buffer)
                ggml.ggml_backend_tensor_alloc(buffer, leaf, ggml.ggml_backend_buffer_get_base(buffer))
                ggml.ggml_backend_tensor_copy(t, leaf)
            else:
                ggml.ggml_backend_tensor_alloc(t.contents.buffer, leaf, t.contents.data)
            segment.aliases[address] = leaf
            self.carried.add(ctypes.addressof(leaf.contents))
        if copy:
            ggml.ggml_gallocr_free(self.allocators.pop())

    def plan(self) -> None:
        """After the recording step: place every segment in one graph with one allocation, so that
        memory is shared across the step (a segment's buffer no longer outlives it).  The aliases
        become views of the tensors they stand for (so the whole graph sees the dependency), and
        outputs stay untouched only when frame inputs or read after a later segment ran."""
        tensors = []
        t = ggml.ggml_get_first_tensor(self.ctx)
        while t:
            tensors.append(t)
            t = ggml.ggml_get_next_tensor(self.ctx, t)
        free_allocators(self.allocators)
        self.allocators.clear()
        free_buffers(self.buffers)
        self.buffers.clear()
        aliases = {ctypes.addressof(a.contents): segment.outputs[address]
                   for segment in self.segments for address, a in segment.aliases.items()}
        by_address = {ctypes.addressof(t.contents): t for t in tensors}
        kept = set()                                 # late reads, and the memory their views read
        for address in self.late:
            t = aliases.get(address, by_address.get(address))
            while t:
                kept.add(ctypes.addressof(t.contents))
                t = t.contents.view_src
        for t in tensors:
            c = t.contents
            c.buffer, c.data = None, None
            source = aliases.get(ctypes.addressof(c))
            if source is not None:                   # a leaf over a computed tensor -> a view of it
                c.op, c.src[0] = ggml.GGML_OP_VIEW, source
                c.view_src = source.contents.view_src or source
                c.view_offs = source.contents.view_offs if source.contents.view_src else 0
            elif c.flags & ggml.GGML_TENSOR_FLAG_OUTPUT and not c.flags & ggml.GGML_TENSOR_FLAG_INPUT \
                    and ctypes.addressof(c) not in kept:
                c.flags &= ~ggml.GGML_TENSOR_FLAG_OUTPUT
        size = len(tensors) + 4096
        self.whole = ggml.ggml_new_graph_custom(self.context(ggml.ggml_graph_overhead_custom(size, False)), size, False)
        bounds = [0]
        for segment in self.segments:               # its outputs, then the views numpy reads them through
            for t in list(segment.outputs.values()) + list(segment.aliases.values()):
                ggml.ggml_build_forward_expand(self.whole, t)
            bounds.append(ggml.ggml_graph_n_nodes(self.whole))
        allocator = ggml.ggml_gallocr_new(self.engine.buffer_type)
        self.allocators.append(allocator)
        if not ggml.ggml_gallocr_alloc_graph(allocator, self.whole):
            raise RuntimeError("ggml could not allocate the step's graph")
        for segment, start, stop in zip(self.segments, bounds, bounds[1:]):
            segment.graph = ggml.ggml_graph_view(self.whole, start, stop)
        self.frame_serial = None                     # the frame inputs moved: copy them again

    def flush(self) -> None:
        """Copy the pending inputs whose tensors are allocated (later segments' stay pending)."""
        waiting = []
        for t, array in self.pending:
            if t.contents.data:
                self.engine.write(t, array)
            else:
                waiting.append((t, array))
        self.pending = waiting


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
        """Scores per query block of at most ATTENTION_SCORES entries; softmax in float32."""
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
                query = np.arange(start, stop)[:, None] + causal_shift
                key = np.arange(S)[None, :]
                hidden = key > query
                if window is not None:
                    hidden |= query - key >= window
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


class GraphWeights(Mapping):
    """A model's weights with its vectors (norm weights, scalars) as constant graph tensors."""

    def __init__(self, weights: Mapping[str, Any], vectors: Mapping[str, DeviceWeight], step: "GraphStep"):
        self.weights, self.vectors, self.step = weights, vectors, step

    def __getitem__(self, name: str) -> Any:
        if name in self.vectors:
            w = self.vectors[name]
            return Lazy(self.step.ops.trace, w.tensor, len(w.shape))
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


class GraphStep:
    """`fn(network, frame, state, knobs)` traced into ggml graphs and replayed (module docstring),
    when some of the step's products run in ggml; when every product takes numpy's BLAS route
    (float32 weights, or types without an int8 kernel here, at enough rows) the step runs op by op.
    Traces live in the backend's cache (`traces`, the TRACE_CACHE most recent), keyed by the step
    function's name and the shapes of its inputs, so later engines and canvases with the same
    shapes replay them.  Results are numpy arrays, like the per-op path's."""

    def __init__(self, fn: Callable[..., Any], backend: Any):
        self.fn, self.backend = fn, backend
        self.ops = GraphOps(backend)
        self.network: Any = None
        self.traced_network: Any = None
        self.recordings = self.replays = 0   # steps traced afresh / replayed from a trace

    def __call__(self, network: Any, frame: Any, state: Any, knobs: Any) -> Any:
        if network is not self.network:          # the same model over the graph ops (the network may be proxied)
            from portable_dg.models.diffusion_gemma import DiffusionGemma

            self.network = network
            self.traced_network = DiffusionGemma(network.config, GraphWeights(network.weights, self.backend.vectors,
                                                                              self), self.ops)
        if not self.backend.products_in_ggml(network, int(np.prod(state.canvas.shape))):
            return self.fn(network, frame, state, knobs)        # all BLAS: the graphs would only add segments
        if state.soft is None:       # zeros condition nothing (see the module docstring): one trace
            state = dataclasses.replace(state, soft=np.zeros((*state.canvas.shape, network.config.hidden_size),
                                                             np.float32))
        key = (self.fn.__module__, self.fn.__qualname__, signature(frame, state))
        traces = self.backend.traces
        trace = traces.pop(key, None)
        if trace is not None:
            try:
                result = self.run(trace, frame, state, knobs)
                traces[key] = trace
                self.replays += 1
                return result
            except Diverged:
                pass
        while len(traces) >= TRACE_CACHE:
            traces.popitem(last=False)
        trace = Trace(self.backend.engine, self.ops)
        self.recordings += 1
        result = self.run(trace, frame, state, knobs)
        trace.plan()
        traces[key] = trace
        return result

    def run(self, trace: Trace, frame: Any, state: Any, knobs: Any) -> Any:
        """One step on a trace (recording it when new); a trace that fails part-way is dropped."""
        trace.ops, self.ops.trace = self.ops, trace
        trace.start(frame.serial)
        return materialized(self.fn(self.traced_network, self.traced_frame(frame), state, knobs))

    def traced_frame(self, frame: Any) -> Any:
        """The frame with its arrays as frame inputs of the trace (always in the same order)."""
        trace = self.ops.trace
        rope = {key: (trace.input(cos, frame=True), trace.input(sin, frame=True))
                for key, (cos, sin) in frame.rope.items()}
        contexts = None
        if frame.contexts is not None:
            contexts = [[dataclasses.replace(g, keys=trace.input(g.keys, frame=True),
                                             values=trace.input(g.values, frame=True)) for g in groups]
                        for groups in frame.contexts]
        return dataclasses.replace(frame, rope=rope, contexts=contexts)


def signature(frame: Any, state: Any) -> tuple:
    """The shapes a step's graphs depend on: canvases, rotary tables, context groups per layer."""
    contexts = () if frame.contexts is None else tuple(
        tuple((len(g.members), tuple(g.keys.shape)) for g in groups) for groups in frame.contexts)
    return tuple(state.canvas.shape), tuple(tuple(cos.shape) for cos, _ in frame.rope.values()), contexts


def materialized(value: Any) -> Any:
    """A dataclass, tuple or array with every Lazy replaced by a numpy copy of its value."""
    if isinstance(value, Lazy):
        return np.array(value)
    if isinstance(value, tuple):
        return tuple(materialized(v) for v in value)
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: materialized(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    return value
