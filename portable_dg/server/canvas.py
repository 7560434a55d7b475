"""Infill and edit on one fixed-length canvas: kept text becomes pinned positions, text to rewrite
seeds the starting canvas, and gaps are noise the model denoises.

The canvas has exactly `canvas_length` positions and a pinned token never moves, so every span's
length in tokens is fixed before denoising starts: a kept span keeps its tokens, a span to rewrite
keeps its token count unless the request gives `length`, and a gap has the length it is given.
After the last span the canvas is pinned to EOS and then padding, so the text ends there.  Only
one canvas is planned: block diffusion denoises a canvas seeing the prompt and the canvases before
it, never the ones after, so pins in a later canvas could not steer an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..tokenizer import Tokenizer


@dataclass
class Span:
    """A run of canvas positions: kept (pinned) or written by the model."""

    ids: list[int]              # kept: the pinned ids; written: the old ids that seed the canvas
    keep: bool
    length: int                 # positions on the canvas (== len(ids) when kept)


@dataclass
class CanvasPlan:
    """A one-canvas generation: where each span sits, the starting canvas and the pins."""

    spans: list[Span]
    starts: list[int]           # canvas position of each span
    start_canvas: np.ndarray    # [L] initial ids
    pinned: dict[int, int]      # canvas position -> id the sampler never changes

    def span_ids(self, canvas: Sequence[int], stop_ids: set[int]) -> list[list[int]]:
        """Each span's ids on a finished canvas [L]; a written span ends at its first EOS or pad
        (the model's way of leaving part of a gap empty)."""
        out = []
        for span, start in zip(self.spans, self.starts):
            ids = [int(i) for i in canvas[start:start + span.length]]
            if not span.keep:
                ids = ids[:next((k for k, i in enumerate(ids) if i in stop_ids), len(ids))]
            out.append(ids)
        return out


def plan_canvas(spans: Sequence[Span], canvas_length: int, vocab_size: int, eos_id: int | None,
                pad_id: int | None, rng: np.random.Generator) -> CanvasPlan:
    """Lay spans out from position 0; EOS then padding pinned after the last one."""
    used = sum(s.length for s in spans)
    if used > canvas_length:
        sizes = " + ".join(f"{s.length} {'kept' if s.keep else 'written'}" for s in spans)
        raise ConfigError(f"the spans take {used} tokens ({sizes}) but a canvas holds {canvas_length}")
    canvas = rng.integers(0, vocab_size, size=canvas_length, dtype=np.int64)
    pinned: dict[int, int] = {}
    starts, position = [], 0
    for span in spans:
        if span.length < 0 or (span.keep and span.length != len(span.ids)):
            raise ConfigError(f"span length {span.length} does not fit its {len(span.ids)} kept tokens")
        starts.append(position)
        seed = span.ids[:span.length]
        canvas[position:position + len(seed)] = seed
        if span.keep:
            pinned.update({position + k: int(i) for k, i in enumerate(span.ids)})
        position += span.length
    if position < canvas_length and eos_id is not None:
        pinned[position] = eos_id
        if pad_id is not None:
            pinned.update({p: pad_id for p in range(position + 1, canvas_length)})
    for p, i in pinned.items():
        canvas[p] = i
    return CanvasPlan(list(spans), starts, canvas, pinned)


def infill_spans(tokenizer: Tokenizer, suffix: str, gap: int | None, canvas_length: int) -> list[Span]:
    """A gap, then the suffix kept.  The gap is `gap` tokens, or by default the rest of the canvas
    less one position for EOS."""
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    if gap is None:
        gap = canvas_length - len(suffix_ids) - 1
    if gap < 1 or gap + len(suffix_ids) > canvas_length:
        raise ConfigError(f"the suffix takes {len(suffix_ids)} tokens, which leaves no gap of "
                          f"{max(gap, 1)} token(s) on a {canvas_length}-token canvas; shorten the suffix "
                          "or max_tokens")
    return [Span([], False, gap), Span(suffix_ids, True, len(suffix_ids))]


def edit_spans(tokenizer: Tokenizer, segments: Sequence[tuple[str, bool, int | None]]) -> list[Span]:
    """(text, keep, length) segments as spans: kept text pinned; text to rewrite seeds the canvas
    and keeps its token count unless `length` is given (an empty text with a length is an insertion)."""
    spans = []
    for text, keep, length in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if keep and length is not None and length != len(ids):
            raise ConfigError(f"a kept segment keeps its {len(ids)} tokens; it cannot take length {length}")
        spans.append(Span(ids, keep, len(ids) if length is None else length))
    return spans
