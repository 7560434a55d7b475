"""One request's generation as a stream of events the endpoints format: drafts (the canvas after
each denoising step, then the committed canvas), text as it becomes final, and the finish.

A plain generation streams text canvas by canvas (`TextStream`).  An infill or edit generation
(`CanvasPlan`) denoises one canvas with pinned spans and reads its written spans at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..sampler import BlockInfo, StepInfo
from ..tokenizer import Tokenizer
from .canvas import CanvasPlan
from .prompts import TextStream, TokenPieces, cut_at_stop, text_before_eos
from .worker import Job


@dataclass
class GenerationRequest:
    """What to run: the prompt, the engine options, and how to read the result."""

    prompt_ids: list[int]
    options: dict[str, Any]             # Engine.submit keywords (knobs, seed, greedy, pins, ...)
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    plan: CanvasPlan | None = None      # infill / edit; None: a plain continuation
    drafts: bool = False                # stream the canvas after every step


@dataclass
class Finish:
    """How a generation ended."""

    reason: str                         # "stop" (EOS, stop string, end of an infill) or "length"
    text: str                           # the visible text (infill/edit: the written spans)
    prompt_tokens: int
    completion_tokens: int
    steps: list[int]                    # denoising steps of each canvas
    spans: list[str] | None = None      # infill/edit: each span's text, kept ones included


class Generation:
    """Events of one submitted request: ("draft", dict), ("text", str) and finally ("finish", Finish)."""

    def __init__(self, job: Job, request: GenerationRequest, tokenizer: Tokenizer, eos: set[int],
                 pad: int | None, pieces: TokenPieces):
        self.job, self.request = job, request
        self.tokenizer, self.eos, self.pad, self.pieces = tokenizer, eos, pad, pieces
        self.steps: list[int] = []
        self.last_step: StepInfo | None = None

    async def start(self) -> None:
        """Submit to the engine; bad options raise ConfigError here."""
        await self.job.submit(self.request.prompt_ids, {**self.request.options, "on_step": True, "on_block": True})

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """The events, in order; the engine slot is freed when this ends, however it ends."""
        request = self.request
        text = None if request.plan else TextStream(self.tokenizer, self.eos, request.max_tokens, request.stop)
        try:
            while True:
                kind, payload = await self.job.next_event()
                if kind == "error":
                    raise payload
                if kind == "done":
                    break
                if kind == "step":
                    self.record_step(payload)
                    if request.drafts:
                        yield "draft", self.draft(payload)
                    continue
                if request.drafts:
                    yield "draft", self.committed(payload)
                if text is not None:
                    delta = text.push(payload.ids)
                    if delta:
                        yield "text", delta
                    if text.finish_reason == "stop" and not payload.finished:
                        break                       # a stop string: the remaining canvases are not needed
            if text is None:
                finish = self.read_plan()
            else:
                tail = text.finish()
                if tail:
                    yield "text", tail
                finish = Finish(text.finish_reason, text.text, len(request.prompt_ids), text.tokens, self.steps)
            if finish.text and request.plan:
                yield "text", finish.text
            yield "finish", finish
        finally:
            self.job.close()

    def record_step(self, info: StepInfo) -> None:
        if info.step == 1:
            self.steps.append(0)
        self.steps[-1] = info.step
        self.last_step = info

    def read_plan(self) -> Finish:
        """Infill/edit: each span's text on the final canvas (the last step's argmax)."""
        plan = self.request.plan
        stop_ids = self.eos | ({self.pad} if self.pad is not None else set())
        span_ids = plan.span_ids(self.last_step.draft, stop_ids)
        spans = [self.tokenizer.decode(ids) for ids in span_ids]
        written = "".join(t for t, s in zip(spans, plan.spans) if not s.keep)
        at = cut_at_stop(written, self.request.stop)
        written = written if at is None else written[:at]
        tokens = sum(len(ids) for ids, s in zip(span_ids, plan.spans) if not s.keep)
        return Finish("stop", written, len(self.request.prompt_ids), tokens, self.steps, spans)

    def draft(self, info: StepInfo) -> dict[str, Any]:
        """The draft event's payload for one denoising step."""
        return {"canvas": info.block, "step": info.step, "steps_left": info.steps_left,
                "temperature": round(info.temperature, 6), "accepted": info.accepted,
                "mean_entropy": info.mean_entropy, "stopped": info.stopped, "committed": False,
                "text": text_before_eos(self.tokenizer, info.draft, self.eos),
                "tokens": self.pieces(info.draft), "elapsed_ms": self.elapsed_ms()}

    def committed(self, info: BlockInfo) -> dict[str, Any]:
        """The last draft event of a canvas: the committed canvas (padding after an EOS)."""
        last = self.last_step
        return {"canvas": info.block, "step": last.step, "steps_left": last.steps_left,
                "temperature": round(last.temperature, 6), "accepted": last.accepted,
                "mean_entropy": last.mean_entropy, "stopped": last.stopped, "committed": True,
                "finished": info.finished, "text": text_before_eos(self.tokenizer, info.ids, self.eos),
                "tokens": self.pieces(info.ids), "elapsed_ms": self.elapsed_ms()}

    def elapsed_ms(self) -> float:
        return round(1000 * (time.monotonic() - self.job.started), 1)
