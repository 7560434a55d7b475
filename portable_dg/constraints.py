"""Constrained denoising: JSON Schema, regular expressions and grammars on a diffusion canvas.

DiffusionGemma's canvas always holds real tokens (uniform-state diffusion, no [MASK]), so a
left-to-right grammar check applies at every step: each step, the sampler hands the model's
proposal for the canvas to `CanvasConstraint.walk`, which reads it left to right from the state
of the committed text and replaces only the tokens that the constraint does not allow after
the tokens to their left.  The grammar engine is llguidance (the `constrain` extra); a
tokenizer is bridged to it once and cached.

    constraint = make_constraint(json_schema={"type": "object", ...})      # ConfigError if invalid
    state = CanvasConstraint(constraint, token_bridge(tokenizer, vocab_size, eos_ids))
    canvas, argmax = state.walk(sampled, accepted, topk_ids, topk_logits, uniforms, noise_ids,
                                masked_choice, budget_left=...)            # every step
    state.commit(argmax)                                                   # every canvas
    state.complete                                                         # at the end

The README section "Constrained output" describes the algorithm and its cost.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ConfigError, PortableDGError
from .tokenizer import Tokenizer

# (j, allowed bitmask [ceil(V / 32)] int32, "sample" | "argmax") -> a token id allowed by the mask
MaskedChoice = Callable[[int, np.ndarray, str], int]

# The closing search (`_Cursor.closing`) tries one-byte tokens class by class: closers first, so a
# structure is shut as soon as the grammar lets it; then digits and separators (a number, the next
# item or key), letters, other printable bytes; whitespace, which never brings a text closer to
# its end, last.
_BYTE_CLASSES = (b"\"'}])>", b"0123456789", b",:;", bytes(range(97, 123)), bytes(range(65, 91)),
                 bytes(b for b in range(33, 127) if not chr(b).isalnum() and b not in b"\"'}])>,:;"),
                 b" \n\t\r")
_PLAN_TRIES = 1024          # steps the closing search may try before it gives up


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConfigError("constrained output needs the llguidance package: "
                          "pip install 'portable-dg[constrain]'") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A checked constraint: its kind, the user's source text and llguidance's grammar."""

    kind: str           # "json_schema", "json_object", "regex" or "grammar"
    source: str
    grammar: str        # llguidance's serialized grammar


def make_constraint(*, json_schema: Mapping[str, Any] | str | None = None, json_object: bool = False,
                    regex: str | None = None, grammar: str | None = None) -> Constraint | None:
    """The constraint of one request, or None when none is given.

    `json_schema` is a JSON Schema (a dict or its JSON text); `json_object` asks for any JSON
    object; `regex` is a regular expression the whole text must match (Rust `regex` syntax);
    `grammar` is a context-free grammar in Lark syntax (llguidance's dialect) or GBNF (llama.cpp's,
    recognised by `::=`).  At most one may be given; an invalid one raises ConfigError."""
    given = [name for name, value in (("json_schema", json_schema), ("json_object", json_object),
                                      ("regex", regex), ("grammar", grammar)) if value not in (None, False)]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"give at most one of json_schema, json_object, regex, grammar (got {', '.join(given)})")
    llg = _llguidance()
    kind = given[0]
    if kind == "json_object":
        json_schema, kind = {"type": "object"}, "json_object"
    try:
        if kind in ("json_schema", "json_object"):
            if isinstance(json_schema, str):
                json_schema = json.loads(json_schema)
            if not isinstance(json_schema, Mapping):
                raise ConfigError(f"json_schema: expected a JSON object, got {type(json_schema).__name__}")
            source = json.dumps(json_schema)
            compiled = llg.LLMatcher.grammar_from_json_schema(source)
        elif kind == "regex":
            source = _text(regex, "regex")
            compiled = llg.LLMatcher.grammar_from_regex(source)
        else:
            source = _text(grammar, "grammar")
            compiled = llg.grammar_from("gbnf", source)     # Lark passes through; GBNF is converted
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{kind}: {_one_line(str(e))}") from None
    error = llg.LLMatcher.validate_grammar(compiled)
    if error:
        raise ConfigError(f"{kind}: {_one_line(error, keep_position=kind == 'grammar')}")
    return Constraint(kind, source, compiled)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
    return value


def _one_line(message: str, keep_position: bool = False) -> str:
    """llguidance's multi-line error (source echo, caret markers) as one line."""
    lines = []
    for line in message.strip().splitlines():
        text = line.strip()
        if not text or set(text) <= set("^~ ") or re.match(r"\d+ \|", text) or text in lines:
            continue
        lines.append(text)
    out = " ".join(lines)
    out = re.sub(r"\s*\(in regex\)", "", out)
    if not keep_position:
        out = re.sub(r"^at \d+\(\d+\): ", "", out)      # a position in llguidance's wrapper, not the user's text
    return out


class TokenBridge:
    """One tokenizer as llguidance sees it, plus what the closing search needs from it.

    Build it with `token_bridge` (cached: building takes about 1.6 s at a 262,144-token vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.eos = tuple(dict.fromkeys(int(e) for e in eos_ids))    # in the checkpoint's order
        self.eos_ids = frozenset(self.eos)
        if not self.eos:
            raise ConfigError("constrained output needs the model's EOS token id (generation_config.json "
                              "eos_token_id)")
        eos = list(self.eos)
        try:
            self.llt = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        except Exception:       # not a tokenizer.json llguidance reads itself (sentencepiece, WordLevel, ...)
            self.llt = llg.LLTokenizer(llg.TokenizerWrapper(_TokenTable(tokenizer, eos[0])),
                                       n_vocab=vocab_size, eos_token=eos)
        self.byte_values, self.byte_ids, self.byte_classes = self._byte_tokens()
        self.token_of_byte = dict(zip(self.byte_values.tolist(), self.byte_ids.tolist()))
        self.byte_values, self.byte_classes = self.byte_values.tolist(), self.byte_classes.tolist()
        self._lengths: np.ndarray | None = None

    def _byte_tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tokens that are exactly one byte, in the closing search's order: (byte, token id, class)."""
        found = {}
        for b in range(256):
            ids = self.llt.tokenize_bytes(bytes([b]))
            if len(ids) == 1 and not self.llt.is_special_token(ids[0]) and self.llt.decode_bytes(ids) == bytes([b]):
                found[b] = ids[0]
        order = [(b, rank) for rank, members in enumerate(_BYTE_CLASSES) for b in members]
        order += [(b, len(_BYTE_CLASSES)) for b in range(256) if b not in {b for b, _ in order}]
        rows = [(b, found[b], rank) for b, rank in order if b in found]
        return tuple(np.array(column, np.int64) for column in zip(*rows)) if rows else \
            (np.zeros(0, np.int64),) * 3

    def token_lengths(self) -> np.ndarray:
        """Byte length of every token [V] (special tokens: a large number); computed on first use."""
        if self._lengths is None:
            self._lengths = np.array([len(self.llt.decode_bytes([i])) if not self.llt.is_special_token(i)
                                      else 1 << 20 for i in range(self.vocab_size)], np.int64)
        return self._lengths


class _TokenTable:
    """What llguidance's TokenizerWrapper reads from a tokenizer it cannot load by itself."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = eos_id, tokenizer.token_to_id(tokenizer.bos_token or "<bos>")
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.tokens = [self._bytes(i) for i in range(tokenizer.vocab_size)]

    def _bytes(self, i: int) -> bytes:
        if self.tokenizer.kind == "sentencepiece":
            piece = self.tokenizer.backend.id_to_piece(i)
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):           # byte fallback
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")

    def __call__(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", errors="replace"))


_BRIDGES: "weakref.WeakKeyDictionary[Tokenizer, dict[tuple, TokenBridge]]" = weakref.WeakKeyDictionary()


def token_bridge(tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> TokenBridge:
    """The TokenBridge of (tokenizer, vocabulary size, EOS ids), built once while the tokenizer lives."""
    key = (int(vocab_size), tuple(int(e) for e in eos_ids))
    per_tokenizer = _BRIDGES.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        per_tokenizer[key] = TokenBridge(tokenizer, vocab_size, eos_ids)
    return per_tokenizer[key]


def resample_uniform(u: float) -> float:
    """A uniform in [0, 1) derived from u (splitmix64 of its bits): the fresh draw a re-sample uses,
    so that it does not depend on the draw whose token the constraint refused."""
    z = (int(np.float64(u).view(np.uint64)) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def mask_allows(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each id is allowed by a bitmask [ceil(V / 32)] int32 (bit i % 32 of word i // 32)."""
    ids = np.asarray(ids, np.int64)
    return ((mask.view(np.uint32)[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1).astype(bool)


def nth_allowed(mask: np.ndarray, n: int) -> int:
    """The n-th allowed id (from 0) of a bitmask, counting upwards."""
    words = mask.view(np.uint32)
    counts = np.cumsum(np.bitwise_count(words), dtype=np.int64)
    w = int(np.searchsorted(counts, n, side="right"))
    n -= int(counts[w - 1]) if w else 0
    bits = np.nonzero((int(words[w]) >> np.arange(32)) & 1)[0]
    return w * 32 + int(bits[n])


def clear_ids(mask: np.ndarray, ids: Sequence[int] | frozenset[int]) -> np.ndarray:
    """A copy of a bitmask with the given ids disallowed."""
    out = mask.copy()
    words = out.view(np.uint32)
    for i in ids:
        words[i >> 5] &= np.uint32(~(1 << (i & 31)) & 0xFFFFFFFF)
    return out


def _inverse_cdf(logits: np.ndarray, u: float) -> int:
    """Index of an inverse-CDF sample of softmax(logits) with the uniform u (host side, float64)."""
    cdf = np.cumsum(np.exp(logits.astype(np.float64) - logits.max()))
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(logits) - 1)


class _Cursor:
    """The constraint's matcher moved over a canvas from the committed state (and put back after)."""

    def __init__(self, matcher: Any, bridge: TokenBridge, stats: dict[str, int]):
        self.m, self.bridge, self.stats = matcher, bridge, stats
        self.depth = 0                                  # tokens consumed past the committed state
        self.buffer = np.zeros((bridge.vocab_size + 31) // 32, np.int32)

    def valid(self, t: int) -> bool:
        """Token t may follow the text so far (EOS: the text so far is complete)."""
        if t in self.bridge.eos_ids:
            return self.m.is_accepting()
        return 0 <= t < self.bridge.vocab_size and self.m.validate_tokens([t]) == 1

    def consume(self, tokens: Sequence[int]) -> None:
        if not self.m.consume_tokens([int(t) for t in tokens]):
            raise PortableDGError(f"constraint: internal error, a checked token was refused ({self.m.get_error()})")
        self.depth += len(tokens)

    def rollback(self, n: int) -> None:
        if n:
            self.m.rollback(n)
            self.depth -= n

    def mask(self) -> np.ndarray:
        """The tokens allowed after the text so far: llguidance's bitmask [ceil(V / 32)] int32 (a copy)."""
        self.m.unsafe_compute_mask_ptr(self.buffer.ctypes.data, self.buffer.nbytes)
        self.stats["masks"] += 1
        if not self.buffer.any():
            raise PortableDGError("constraint: no token can continue the text here"
                                  f"{' (' + self.m.get_error() + ')' if self.m.get_error() else ''}")
        return self.buffer.copy()

    def closing(self) -> list[int] | None:
        """Tokens that make the text so far complete (the grammar accepts it), or None if none found.

        A depth-first search over one-byte tokens: forced bytes are taken whole; otherwise the
        allowed bytes are tried class by class (`_BYTE_CLASSES`), except that where the search
        comes back to a state with the same allowed set (the same mask) it tries first the classes,
        then the bytes, it took there least often: that ends repetitions such as [a-z]+ or (ab)+.
        Where no one-byte token is allowed, tokens of any length, shortest first.  It backs up at
        dead ends and gives up after _PLAN_TRIES steps.  The bytes found are retokenized into
        fewer tokens where the tokenizer has them."""
        self.stats["plans"] += 1
        if self.m.is_accepting():
            return []
        path: list[tuple[list[int], tuple]] = []        # (tokens, choice key) at each depth
        taken: dict[tuple, int] = {}                    # (mask, class) and (mask, byte) -> times on the path
        frames = [self._moves(taken)]
        tries = 0
        while frames and tries < _PLAN_TRIES:
            move = next(frames[-1], None)
            if move is None:                            # dead end: back up one
                frames.pop()
                if path:
                    tokens, keys = path.pop()
                    self.rollback(len(tokens))
                    for key in keys:
                        taken[key] -= 1
                continue
            tries += 1
            tokens, keys = move
            self.consume(tokens)
            path.append(move)
            for key in keys:
                taken[key] = taken.get(key, 0) + 1
            if self.m.is_accepting():
                plan = [t for step, _ in path for t in step]
                self.rollback(len(plan))
                return self._retokenized(plan)
            frames.append(self._moves(taken))
        while path:
            self.rollback(len(path.pop()[0]))
        return None

    def _moves(self, taken: dict[tuple, int]):
        """The closing search's next steps from the current state, best first: (tokens, choice keys)."""
        bridge = self.bridge
        forced = self.m.compute_ff_bytes()
        if forced and all(b in bridge.token_of_byte for b in forced):
            yield [bridge.token_of_byte[b] for b in forced], ()
            return
        mask = self.mask()
        state = hash(mask.tobytes())
        rows = np.flatnonzero(mask_allows(mask, bridge.byte_ids))
        if taken.get((state,)):                         # been here on this path: least taken first
            rows = sorted(rows.tolist(), key=lambda i: (taken.get((state, "class", bridge.byte_classes[i]), 0),
                                                        bridge.byte_classes[i],
                                                        taken.get((state, "byte", bridge.byte_values[i]), 0)))
        for i in rows:
            yield [int(bridge.byte_ids[i])], ((state,), (state, "class", bridge.byte_classes[i]),
                                               (state, "byte", bridge.byte_values[i]))
        if not len(rows):                               # no one-byte token fits: any token, shortest first
            ids = np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:bridge.vocab_size])[0]
            ids = ids[~np.isin(ids, list(bridge.eos_ids))]
            for i in ids[np.argsort(bridge.token_lengths()[ids], kind="stable")][:16]:
                yield [int(i)], ((state,), (state, "token", int(i)))

    def _retokenized(self, plan: list[int]) -> list[int]:
        """The plan's bytes in fewer tokens, where the tokenizer has them and they complete the text too."""
        shorter = self.bridge.llt.tokenize_bytes(self.bridge.llt.decode_bytes(plan))
        if len(shorter) >= len(plan) or self.m.validate_tokens(shorter) != len(shorter):
            return plan
        self.consume(shorter)
        complete = self.m.is_accepting()
        self.rollback(len(shorter))
        return shorter if complete else plan


class CanvasConstraint:
    """One sequence's constraint state, carried across canvases (see the module docstring).

    `walk` proposes canvases that respect the constraint; `commit` advances over a committed one.
    `stats` counts the work done (walks, masks, closing searches, device choices, replaced tokens)."""

    def __init__(self, constraint: Constraint, bridge: TokenBridge, candidates: int = 16):
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ConfigError(f"candidates must be a positive integer, got {candidates!r}")
        llg = _llguidance()
        self.constraint, self.bridge = constraint, bridge
        self.candidates = candidates            # K: top-K candidates per position the walk wants
        self.matcher = llg.LLMatcher(bridge.llt, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"{constraint.kind}: {_one_line(self.matcher.get_error())}")
        self.finished = False                   # an EOS was committed: the text has ended
        self.committed = 0                      # tokens committed (EOS excluded)
        self.stats = dict(walks=0, masks=0, plans=0, device_choices=0, replaced=0)

    @property
    def accepting(self) -> bool:
        """The committed text is complete: EOS may follow (or already did)."""
        return self.finished or self.matcher.is_accepting()

    complete = accepting

    def commit(self, ids: Sequence[int] | np.ndarray) -> None:
        """Advance over a committed canvas: its tokens up to the first EOS (the rest is padding)."""
        if self.finished:
            raise PortableDGError("constraint: a canvas was committed after the text ended")
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        end = next((j for j, t in enumerate(ids) if t in self.bridge.eos_ids), len(ids))
        text = ids[:end]
        ok = self.matcher.validate_tokens(text) if text else 0
        if ok < len(text):
            raise PortableDGError(f"constraint: committed token {text[ok]} at canvas position {ok} is not "
                                  "allowed after the text to its left")
        if text and not self.matcher.consume_tokens(text):
            raise PortableDGError(f"constraint: internal error ({self.matcher.get_error()})")
        self.committed += len(text)
        if end < len(ids):
            if not self.matcher.is_accepting():
                raise PortableDGError(f"constraint: EOS committed at canvas position {end}, where the text is "
                                      "not complete")
            self.finished = True

    def walk(self, sampled: np.ndarray, accepted: np.ndarray, topk_ids: np.ndarray, topk_logits: np.ndarray,
             uniforms: np.ndarray, noise_ids: np.ndarray, masked_choice: MaskedChoice,
             budget_left: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The step's canvas and argmax canvas, made to respect the constraint; both [L] int64.

        Args (one denoising step; L = canvas length, K = `candidates`, logits already divided by the
        temperature):
            sampled [L]: the model's samples;  accepted [L] bool: positions that keep their sample;
            topk_ids, topk_logits [L, K]: the K most likely tokens per position, descending;
            uniforms [L]: the uniforms in [0, 1) that drew `sampled`;  noise_ids [L]: re-noise ids;
            masked_choice(j, allowed, kind): called when none of position j's K candidates is
                allowed; returns a token of row j among `allowed` (bitmask [ceil(V / 32)] int32,
                bit i % 32 of word i // 32): kind "sample" draws from softmax(row) restricted to
                it (with a uniform independent of uniforms[j], e.g. resample_uniform(uniforms[j])),
                "argmax" takes its largest logit;
            budget_left: positions the generation may still write from this canvas's first one
                (None: no limit); the walk steers towards a complete text before they run out.

        Returns (canvas, argmax).  canvas: accepted positions keep the sample where it is allowed,
        else get a sample of the allowed top-K; other positions keep their noise id where it is
        allowed, else get a uniformly random allowed token.  argmax: the model's argmax where
        allowed, else the likeliest allowed candidate (what the sampler drafts, compares and
        commits).  EOS only where the text is complete; after the first EOS both keep the model's
        own tokens (sample or noise; argmax): they are padding."""
        L = len(sampled)
        sampled, noise_ids = np.asarray(sampled, np.int64), np.asarray(noise_ids, np.int64)
        accepted, uniforms = np.asarray(accepted, bool), np.asarray(uniforms, np.float64)
        topk_ids, topk_logits = np.asarray(topk_ids, np.int64), np.asarray(topk_logits, np.float64)
        if topk_ids.shape != (L, topk_ids.shape[1]) or topk_logits.shape != topk_ids.shape or \
                any(len(a) != L for a in (accepted, uniforms, noise_ids)):
            raise ValueError(f"walk: expected [L] arrays and [L, K] top-K arrays for L={L}, got "
                             f"top-K {topk_ids.shape} / {topk_logits.shape}")
        model_canvas = np.where(accepted, sampled, noise_ids)
        if self.finished:
            return model_canvas, topk_ids[:, 0].copy()
        self.stats["walks"] += 1
        cursor = _Cursor(self.matcher, self.bridge, self.stats)
        eos = self.bridge.eos_ids

        def device(j: int, mask: np.ndarray, kind: str) -> int:
            t = int(masked_choice(j, mask, kind))
            self.stats["device_choices"] += 1
            if not (0 <= t < self.bridge.vocab_size and mask_allows(mask, [t])[0]):
                raise PortableDGError(f"constraint: masked_choice gave token {t} for position {j}, outside "
                                      "the allowed set")
            return t

        def sample_choice(j: int) -> int:
            if accepted[j]:
                if cursor.valid(int(sampled[j])):
                    return int(sampled[j])
                mask = cursor.mask()
                ok = mask_allows(mask, topk_ids[j])
                if ok.any():
                    return int(topk_ids[j][ok][_inverse_cdf(topk_logits[j][ok], resample_uniform(uniforms[j]))])
                return device(j, mask, "sample")
            if int(noise_ids[j]) not in eos and cursor.valid(int(noise_ids[j])):
                return int(noise_ids[j])
            mask = cursor.mask()
            text = clear_ids(mask, eos)                 # noise ends the text only where nothing else may follow
            mask = text if text.any() else mask
            return nth_allowed(mask, int(uniforms[j] * int(np.bitwise_count(mask.view(np.uint32)).sum())))

        def argmax_choice(j: int) -> int:
            if cursor.valid(int(topk_ids[j, 0])):
                return int(topk_ids[j, 0])
            mask = cursor.mask()
            ok = mask_allows(mask, topk_ids[j])
            if ok.any():
                return int(topk_ids[j][ok][np.argmax(topk_logits[j][ok])])
            return device(j, mask, "argmax")

        canvas = self._walk(cursor, sample_choice, model_canvas, budget_left)
        argmax = self._walk(cursor, argmax_choice, topk_ids[:, 0], budget_left)
        self.stats["replaced"] += int((canvas != model_canvas).sum() + (argmax != topk_ids[:, 0]).sum())
        return canvas, argmax

    def _walk(self, cursor: _Cursor, choose: Callable[[int], int], model_canvas: np.ndarray,
              budget_left: int | None) -> np.ndarray:
        """One walk over the canvas from the committed state; the matcher is put back after."""
        out = np.array(model_canvas, np.int64)
        end = self._run(cursor, choose, out, 0, None, budget_left)
        if end is None and budget_left is not None:
            start, plan = self._closable(cursor, out, budget_left)
            if start < len(out):
                end = self._run(cursor, choose, out, start, plan, budget_left)
        if end is not None:
            out[end + 1:] = model_canvas[end + 1:]
        cursor.rollback(cursor.depth)
        return out

    def _run(self, cursor: _Cursor, choose: Callable[[int], int], out: np.ndarray, start: int,
             plan: list[int] | None, budget_left: int | None) -> int | None:
        """Choose positions start.. of `out`, the cursor being at `start`; returns the EOS position.

        With a plan (a way to complete the text from here that fits the budget), every choice must
        leave a way that fits: the model's choice when it does, else the plan's next token (or EOS
        where the text is complete).  A plan that does not fit is followed as it is."""
        for j in range(start, len(out)):
            t = choose(j)
            if t in self.bridge.eos_ids:
                out[j] = t
                return j
            if plan is not None:
                left = budget_left - j - 1              # positions after this one
                if plan and t == plan[0]:
                    plan = plan[1:]
                else:
                    cursor.consume([t])
                    after = cursor.closing()
                    cursor.rollback(1)
                    if after is not None and len(after) <= max(left, len(plan) - 1):
                        plan = after
                    elif plan:
                        t, plan = plan[0], plan[1:]
                    else:                               # complete, and nothing else fits: end here
                        out[j] = self.bridge.eos[0]
                        return j
            cursor.consume([t])
            out[j] = t
        return None

    def _closable(self, cursor: _Cursor, out: np.ndarray, budget_left: int) -> tuple[int, list[int] | None]:
        """Where the walk must re-run under the budget: (position, a plan from there), moving the cursor
        back to that position; (len(out), None) when the text as walked can still be completed in time."""
        L = len(out)
        plan = cursor.closing()
        if plan is None or len(plan) <= budget_left - L:
            return L, None                              # fits (or no way to complete found: nothing to steer by)
        best = (L, plan)
        for j in range(L - 1, -1, -1):
            cursor.rollback(1)
            plan = cursor.closing()
            if plan is None:
                continue
            if len(plan) <= budget_left - j:
                return j, plan
            if len(plan) - (budget_left - j) < len(best[1]) - (budget_left - best[0]):
                best = (j, plan)
        cursor.consume(out[:best[0]])                   # nowhere fits: follow the closest way to a complete text
        return best
