"""Prompts in, text out: chat messages and plain prompts as token ids, and the text a client sees
as canvases commit (cut at EOS, at max_tokens and at stop strings, holding back the tail that a
later canvas or a stop string could still change).  Shared by `pdg serve` and `pdg chat`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError
from ..tokenizer import Tokenizer

REPLACEMENT = "\ufffd"          # what a decoder shows for an incomplete UTF-8 sequence


def message_text(content: str | Sequence[Mapping[str, Any]] | None) -> str:
    """A message's content as text: a string, or the text parts of an OpenAI content list."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ConfigError(f"content parts of type {part.get('type')!r} are not supported; only text")
        texts.append(str(part.get("text", "")))
    return "\n".join(texts)


def chat_prompt_ids(tokenizer: Tokenizer, messages: Iterable[Mapping[str, Any]],
                    enable_thinking: bool = False) -> list[int]:
    """Messages ({"role", "content"}) through the checkpoint's chat template, with the generation
    prompt, as ids.  A template that rejects the messages raises PortableDGError."""
    flat = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
    text = tokenizer.apply_chat_template(flat, add_generation_prompt=True, enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def text_prompt_ids(tokenizer: Tokenizer, bos_id: int | None, text: str) -> list[int]:
    """A plain prompt: BOS (unless the text starts with it) and the text's ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    return ids


class TokenPieces:
    """Each id's own text (special tokens included), cached: the cells of a draft canvas."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Iterable[int]) -> list[str]:
        pieces = []
        for i in ids:
            i = int(i)
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i], skip_special_tokens=False)
            pieces.append(self.cache[i])
        return pieces


def text_before_eos(tokenizer: Tokenizer, ids: Iterable[int], eos: set[int]) -> str:
    """The text of ids up to the first EOS (special tokens skipped)."""
    kept = []
    for i in ids:
        if int(i) in eos:
            break
        kept.append(int(i))
    return tokenizer.decode(kept)


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    """The visible text of a generation, fed one committed canvas at a time.

    `push` returns the text that can no longer change; `finish` the rest.  The text ends at the first
    EOS, after max_tokens tokens, or before the first stop string; `finish_reason` is then "stop"
    (EOS or stop string) or "length"."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Iterable[int], max_tokens: int, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.eos = {int(i) for i in eos_ids}
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0                       # characters of text already handed out
        self.tokens = 0                     # ids behind the visible text
        self.finish_reason: str | None = None

    def push(self, canvas_ids: Iterable[int]) -> str:
        """Add a committed canvas; returns the newly final text."""
        if self.finish_reason is None:
            for i in canvas_ids:
                if int(i) in self.eos:
                    self.finish_reason = "stop"
                    break
                self.ids.append(int(i))
                if len(self.ids) >= self.max_tokens:
                    self.finish_reason = "length"
                    break
            self.text = self.tokenizer.decode(self.ids)
            self.tokens = len(self.ids)
            self.apply_stop()
        return self.release(final=self.finish_reason is not None)

    def finish(self) -> str:
        """The generation ended: the text not yet handed out."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self.release(final=True)

    def apply_stop(self) -> None:
        at = cut_at_stop(self.text, self.stop)
        if at is None:
            return
        self.text, self.finish_reason = self.text[:at], "stop"
        self.tokens = next(k for k in range(len(self.ids) + 1)
                           if len(self.tokenizer.decode(self.ids[:k])) >= at)

    def release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self.held_back()
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def held_back(self) -> int:
        """Characters at the end that may still change: an unfinished UTF-8 sequence, or the start
        of a stop string."""
        text = self.text
        held = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held
