"""The denoising step as whole ggml graphs: traced once per shape, replayed every step.

`GgmlBackend.compile_step(fn)` returns a `GraphStep`.  It runs `fn` (the decoder pass plus the
sampler's step, `portable_dg.sampler.denoise_step`: the model and the sampler, unchanged) on
`GraphOps` (`graph_ops.py`), a backend whose arrays are `Lazy` (`trace.py`): each op adds ggml
nodes instead of computing.  A lazy array becomes a numpy array when something needs its value:
an op ggml has no node for (the sampler's integer and sorting work, its token statistics, which
must match the numpy reference exactly), a product routed to numpy's BLAS, or the step's results.
Then every lazy array still referenced from Python is computed in one ggml graph (a *segment*) on
ggml's thread pool, the step goes on in numpy, and the next ggml op starts the next segment.  With
every product in ggml a step is two segments: the decoder pass, the tied head, soft-capping and the
temperature ([B, L, V] scaled logits, read by the token statistics), then the self-conditioning
soft embedding of those logits; each BLAS product adds a segment boundary.

Replay.  The graph ops of a step and their operands are recorded on a tape; after the recording
step all segments are planned as ranges of one graph with one allocation.  The next step runs `fn`
again (its numpy work is small), but each graph op takes its node from the tape, numpy operands are
copied into the recorded input tensors, and each segment's range is computed again.  An op that
does not match the tape (another shape, another branch) discards the trace and the step is
recorded afresh.  The frame's arrays (rotary tables, context keys and values) are inputs copied
only when the frame changes (its serial number), so one trace serves every step of a canvas and
every later canvas or request with the same shapes; a canvas's first step (no self-conditioning
yet) runs on zeros, which the model turns into exactly the unconditioned input.
"""


from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .engine import DeviceWeight
from .graph_ops import GraphOps
from .trace import Diverged, Lazy, Trace

# Traces a backend keeps (the most recently used): one per step shape, e.g. per canvas of a generation.
TRACE_CACHE = 4


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
