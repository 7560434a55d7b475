"""Lazy arrays and their traces: the machinery behind the ggml step graphs (`graph.py`).

A `Lazy` array is a ggml tensor standing for a numpy array; ops on it (`graph_ops.GraphOps`) add
nodes to the current `Trace`.  The trace records its graph ops on a tape, computes them in
segments when numpy needs a value, and after its recording step plans every segment into one
graph with one allocation, which later steps replay.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, Callable, Sequence

import numpy as np

import ggml

from .engine import free_allocators, free_buffers

F32, I32 = ggml.GGML_TYPE_F32, ggml.GGML_TYPE_I32
# Tensors one trace may hold (a released-width step makes a few thousand).
TRACE_TENSORS = 1 << 16


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

    def __init__(self, engine: Any, ops: Any):
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
        """Begin a step of the frame with this serial: replay from the start of the tape (which
        needs `plan()` after the recording step: the recording's memory is gone)."""
        self.recording = not self.tape and not self.segments
        if not self.recording and self.whole is None:
            raise RuntimeError("a ggml trace was replayed before plan()")
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
