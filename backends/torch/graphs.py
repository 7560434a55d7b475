"""The denoising step captured in CUDA graphs (untested on a GPU: no GPU was available to this
project's CI or its authors' machine; the CPU tests cover the keying only).

`TorchBackend.compile_step` returns a `CapturedStep` on CUDA.  A step is a pure function of device
arrays (`portable_dg.sampler.denoise_step`): the decoder pass over the batch's canvases plus the
sampler's per-step work.  Between two changes of the batch (a sequence joining or leaving, a canvas
ending) every step has the same shapes and reads the same cache views, so the first step after a
change runs eagerly on a side stream (its result is used) and is captured; the following steps copy
their inputs into the captured ones and replay.

The key of a capture is the frame's serial number (a counter the model assigns to every frame, so
a new batch or canvas never meets an old graph, even when Python reuses an object's memory) plus
the shapes of the step's inputs.  The step makes no host transfer and no host sync: rotary tables,
context views and knobs live on the device, the experts use the grouped kernel, and the random
numbers come from the counter-based generator.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, Callable

import torch


def step_key(frame: Any, state: Any, knobs: Any) -> tuple:
    """What must match for a captured step to be replayed: the frame (by serial) and input shapes."""
    def shape(x: Any) -> Any:
        return None if x is None else tuple(x.shape)

    dynamic = (state.canvas, state.soft, state.history, knobs.steps_left, knobs.step, knobs.host_noise)
    return (frame.serial, knobs.condition, knobs.all_greedy) + tuple(shape(x) for x in dynamic)


def copy_into(target: Any, source: Any) -> None:
    """Copy every tensor field of dataclass `source` into the same field of `target`."""
    for f in fields(source):
        value = getattr(source, f.name)
        if isinstance(value, torch.Tensor):
            getattr(target, f.name).copy_(value)
        elif is_dataclass(value):
            copy_into(getattr(target, f.name), value)


def clone(value: Any) -> Any:
    """A dataclass of tensors with every tensor cloned (the capture's static inputs)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if is_dataclass(value):
        return type(value)(**{f.name: clone(getattr(value, f.name)) for f in fields(value)})
    return value


class CapturedStep:
    """`fn(network, frame, state, knobs)` replayed from a CUDA graph per step key."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Any, Any] | None = None
        self.outputs: Any = None

    def __call__(self, network: Any, frame: Any, state: Any, knobs: Any) -> Any:
        key = step_key(frame, state, knobs)
        if key != self.key:
            return self.capture(key, network, frame, state, knobs)
        copy_into(self.inputs[0], state)
        copy_into(self.inputs[1], knobs)
        self.graph.replay()
        return self.outputs          # valid until the next call; the engine reads it before then

    def capture(self, key: tuple, network: Any, frame: Any, state: Any, knobs: Any) -> Any:
        """Run the step eagerly on a side stream (returning that result), then capture it."""
        self.graph = self.outputs = None                      # release the previous capture's pool
        self.inputs = (clone(state), clone(knobs))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = clone(self.fn(network, frame, *self.inputs))
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn(network, frame, *self.inputs)
        self.key = key
        return result
