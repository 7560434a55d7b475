"""Many sequences on one model: submitted at any time, denoised step by step together, leaving
when they finish.  This is what `generate_batch`, `pdg serve` and `pdg chat` run on.

    engine = Engine(model, max_batch=8)
    seq = engine.submit(prompt_ids, seed=0, on_step=print)   # validated here
    while engine.active:
        engine.step()                                         # one denoising step of each sequence
    seq.output                                                # a GenerateOutput

The engine is not thread-safe: one thread calls `submit`, `cancel` and `step`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generator, Sequence as Seq

import numpy as np

from .errors import ConfigError
from .runtime import Model
from .sampler import GenerateOutput, sequence_steps


class Sequence:
    """One submitted generation: its state in the engine and, once done, its output."""

    def __init__(self, seq_id: int, steps: Generator[None, None, GenerateOutput]):
        self.id = seq_id
        self.steps = steps
        self.output: GenerateOutput | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        """Finished (its output is set) or cancelled."""
        return self.output is not None or self.cancelled


class Engine:
    """Sequences of one model, advanced one denoising step at a time, at most `max_batch` at once
    (the others wait in submission order)."""

    def __init__(self, model: Model, max_batch: int = 8):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model = model
        self.max_batch = max_batch
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.next_id = 0

    def submit(self, prompt_ids: Seq[int] | np.ndarray, **options: Any) -> Sequence:
        """Queue a generation; options are `portable_dg.generate`'s (knobs, seed, noise, pins,
        start_canvas, on_step, on_block).  Bad options raise ConfigError here."""
        seq = Sequence(self.next_id, sequence_steps(self.model, prompt_ids, **options))
        self.next_id += 1
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence: it takes no further step and frees its place in the batch."""
        seq.cancelled = True
        seq.steps.close()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def active(self) -> int:
        """Sequences submitted and not yet finished or cancelled."""
        return len(self.running) + len(self.waiting)

    def step(self) -> list[Sequence]:
        """Admit waiting sequences up to `max_batch`, then one denoising step of each running one
        (the encoder pass of a new prompt or of a finished canvas comes with it).  Returns the
        sequences that finished in this step."""
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        finished = []
        for seq in list(self.running):
            try:
                next(seq.steps)
            except StopIteration as done:
                seq.output = done.value
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def run(self) -> None:
        """Step until every submitted sequence is done."""
        while self.active:
            self.step()


def generate_batch(model: Model, prompts: Seq[Seq[int] | np.ndarray], *, max_batch: int | None = None,
                   **options: Any) -> list[GenerateOutput]:
    """`portable_dg.generate` for several prompts at once, outputs in prompt order.

    Every option may be one value for all prompts or a list with one value per prompt (a list-valued
    option such as `pinned` or `start_canvas` must then be given per prompt)."""
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("generate_batch needs at least one prompt")
    per_prompt = []
    for i in range(len(prompts)):
        per_prompt.append({k: pick(k, v, i, len(prompts)) for k, v in options.items()})
    engine = Engine(model, max_batch or len(prompts))
    sequences = [engine.submit(p, **o) for p, o in zip(prompts, per_prompt)]
    engine.run()
    return [s.output for s in sequences]


PER_PROMPT_ONLY = ("start_canvas", "pinned")


def pick(name: str, value: Any, i: int, n: int) -> Any:
    """Prompt i's value of an option given once for all or as a list of n."""
    if isinstance(value, (list, tuple)) and (name in PER_PROMPT_ONLY or len(value) == n):
        if len(value) != n:
            raise ConfigError(f"{name}: {len(value)} values for {n} prompts")
        return value[i]
    if name in PER_PROMPT_ONLY and value is not None:
        raise ConfigError(f"{name} must be given per prompt (a list of {n})")
    return value
