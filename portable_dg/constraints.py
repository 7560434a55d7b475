"""Constrained denoising: JSON Schema, regular expressions and grammars on a diffusion canvas.

DiffusionGemma's canvas always holds real tokens (uniform-state diffusion, no [MASK]), so a
left-to-right grammar check applies at every step: each step, the sampler hands the model's
proposal for the canvas to `CanvasConstraint.walk`, which reads it left to right from the state
of the committed text and replaces only the tokens that the constraint does not allow after
the tokens to their left.  The grammar engine is llguidance (the `constrain` extra); a
tokenizer is bridged to it once and cached.

    constraint = make_constraint(json_schema={"type": "object", ...})      # ConfigError if invalid
    state = CanvasConstraint(constraint, token_bridge(tokenizer, vocab_size, eos_ids))
    canvas = state.start(noise_ids, uniforms, budget_left=...)            # every canvas's first canvas
    canvas, argmax = state.walk(sampled, accepted, topk_ids, topk_logits, uniforms, noise_ids,
                                masked_choice, budget_left=...)            # every step
    state.commit(argmax)                                                   # every canvas
    state.accepting                             # at the end: the text is complete (else cut short)

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
_BYTE_CLASSES = (b"\"'}])>", b"0123456789", b",:;.", bytes(range(97, 123)), bytes(range(65, 91)),
                 bytes(b for b in range(33, 127) if not chr(b).isalnum() and b not in b"\"'}])>,:;."),
                 b" \n\t\r")
_STEADY = (0, 2)            # closers and separators
# the closing search's two passes: (steps back in which it looks for a state coming back, closers and
# separators kept first there, steps it may try); the second ends long loops such as (x, )*
_PASSES = ((8, True, 256), (1 << 30, False, 1024))
_NOISE_DRAWS = 3            # further uniform draws a refused noise id gets before the mask is computed
_KNOWN_STATES = 4096        # completions remembered by mask (then forgotten all at once)
_SCAN_MISSES = 8            # failed closing searches after which the budget scan stops looking further back


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
    out = re.sub(r", '.*' \^ '.*'$", "", out)                # GBNF: the text around the error, with a caret
    out = out.replace("Failed to convert the grammar from GBNF to Lark: ", "GBNF: ")
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
        self.llt = None
        if tokenizer.kind == "tokenizers":
            try:
                self.llt = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(self.eos))
            except ValueError:  # a tokenizer.json llguidance does not read itself (WordLevel, a custom decoder)
                pass
        if self.llt is None:
            self.llt = llg.LLTokenizer(llg.TokenizerWrapper(_TokenTable(tokenizer, self.eos[0])),
                                       n_vocab=vocab_size, eos_token=list(self.eos))
        # the one-byte tokens in the closing search's order: byte value, token id [n] and byte class
        self.byte_values, self.byte_ids, self.byte_classes = self._byte_tokens()
        self.token_of_byte = dict(zip(self.byte_values, self.byte_ids.tolist()))
        self.byte_words, self.byte_shifts = self.byte_ids >> 5, (self.byte_ids & 31).astype(np.uint32)
        self._lengths: np.ndarray | None = None

    def _byte_tokens(self) -> tuple[list[int], np.ndarray, list[int]]:
        found = {}
        for b in range(256):
            ids = self.llt.tokenize_bytes(bytes([b]))
            if len(ids) == 1 and not self.llt.is_special_token(ids[0]) and self.llt.decode_bytes(ids) == bytes([b]):
                found[b] = ids[0]
        order = [(b, rank) for rank, members in enumerate(_BYTE_CLASSES) for b in members]
        order += [(b, len(_BYTE_CLASSES)) for b in range(256) if b not in {b for b, _ in order}]
        rows = [(b, found[b], rank) for b, rank in order if b in found]
        return [b for b, _, _ in rows], np.array([t for _, t, _ in rows], np.int64), [r for _, _, r in rows]

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
        self.ids = {t: i for i, t in reversed(list(enumerate(self.tokens)))
                    if t and i not in tokenizer.special_ids}
        self.longest = max(map(len, self.ids), default=1)

    def _bytes(self, i: int) -> bytes:
        if self.tokenizer.kind == "sentencepiece":
            piece = self.tokenizer.backend.id_to_piece(i)
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):           # byte fallback
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")

    def __call__(self, text: bytes) -> list[int]:
        """Token ids whose bytes are exactly `text`: the tokenizer's own where they are (sentencepiece
        adds a leading space and drops trailing ones), else the longest tokens from the left."""
        ids = self.tokenizer.encode(text.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids) == text:
            return ids
        ids, at = [], 0
        while at < len(text):
            n = next((n for n in range(min(self.longest, len(text) - at), 0, -1) if text[at:at + n] in self.ids), 0)
            if n == 0:                                   # a byte no token holds: skip it
                at += 1
                continue
            ids.append(self.ids[text[at:at + n]])
            at += n
        return ids


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


def _fresh_uniforms(u: float, n: int) -> list[float]:
    """n uniforms derived from u, one after the other by resample_uniform."""
    out = []
    for _ in range(n):
        u = resample_uniform(u)
        out.append(u)
    return out


def mask_allows(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each id is allowed by a bitmask [ceil(V / 32)] int32 (bit i % 32 of word i // 32)."""
    ids = np.asarray(ids, np.int64)
    return ((mask.view(np.uint32)[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1).astype(bool)


_BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], np.int64)


def popcount(mask: np.ndarray) -> np.ndarray:
    """Allowed ids per 32-bit word of a bitmask [W] -> [W] int."""
    if hasattr(np, "bitwise_count"):                    # numpy >= 2
        return np.bitwise_count(mask.view(np.uint32))
    return _BYTE_POPCOUNT[mask.view(np.uint8)].reshape(-1, 4).sum(axis=1)


def nth_allowed(mask: np.ndarray, n: int) -> int:
    """The n-th allowed id (from 0) of a bitmask, counting upwards."""
    words = mask.view(np.uint32)
    counts = np.cumsum(popcount(mask), dtype=np.int64)
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


def _noise_choice(cursor: "_Cursor", noise_id: int, u: float) -> int:
    """A re-noised position's token: the noise id where allowed, else a uniformly random allowed token
    (rejection sampling with _NOISE_DRAWS draws derived from u, then a draw among the mask's tokens:
    uniform over the allowed set either way).  EOS only where nothing else may follow."""
    eos = cursor.bridge.eos_ids
    for draw in [noise_id] + [int(u_k * cursor.bridge.vocab_size) for u_k in _fresh_uniforms(u, _NOISE_DRAWS)]:
        if draw not in eos and cursor.valid(draw):
            return draw
    mask = cursor.mask()
    text = clear_ids(mask, eos)
    mask = text if text.any() else mask
    return nth_allowed(mask, int(u * int(popcount(mask).sum(dtype=np.int64))))


def _inverse_cdf(logits: np.ndarray, u: float) -> int:
    """Index of an inverse-CDF sample of softmax(logits) with the uniform u (host side, float64)."""
    cdf = np.cumsum(np.exp(logits.astype(np.float64) - logits.max()))
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(logits) - 1)


def _count(taken: dict[tuple, int], path: list[tuple[list[int], tuple]], sign: int, window: int) -> None:
    """Add (sign +1) the last step of the path to `taken`, and drop the step that leaves the window;
    or (sign -1) undo that, before the last step is removed."""
    for key in path[-1][1]:
        taken[key] = taken.get(key, 0) + sign
    if len(path) > window:
        for key in path[-1 - window][1]:
            taken[key] -= sign


def _rank(taken: dict[tuple, int], state: bytes, byte_class: int, byte: int, steady: bool) -> tuple[int, int, int]:
    """Where a byte goes in the closing search's order at a state met before: its class by how often
    it was taken there (with `steady`, closers and separators stay first), then the byte by how
    often it was taken there."""
    by_class = 0 if steady and byte_class in _STEADY else taken.get((state, "class", byte_class), 0)
    return by_class, byte_class, taken.get((state, "byte", byte), 0)


class _Cursor:
    """The constraint's matcher moved over a canvas from the committed state (and put back after)."""

    def __init__(self, matcher: Any, bridge: TokenBridge, stats: dict[str, int], closings: dict[tuple, Any],
                 known: dict[tuple, list[int]]):
        self.m, self.bridge, self.stats = matcher, bridge, stats
        self.path: list[int] = []                       # tokens consumed past the committed state
        self.closings = closings                        # path -> closing (until the next commit)
        self.known = known                              # mask key -> a completion found from such a state
        self.buffer = np.zeros((bridge.vocab_size + 31) // 32, np.int32)

    @property
    def depth(self) -> int:
        return len(self.path)

    def valid(self, t: int) -> bool:
        """Token t may follow the text so far (EOS: the text so far is complete)."""
        if t in self.bridge.eos_ids:
            return self.m.is_accepting()
        return 0 <= t < self.bridge.vocab_size and self.m.validate_tokens([t]) == 1

    def consume(self, tokens: Sequence[int]) -> None:
        if not self.m.consume_tokens([int(t) for t in tokens]):
            raise PortableDGError(f"constraint: internal error, a checked token was refused ({self.m.get_error()})")
        self.path += [int(t) for t in tokens]

    def rollback(self, n: int) -> None:
        if n:
            self.m.rollback(n)
            del self.path[-n:]

    def mask(self) -> np.ndarray:
        """The tokens allowed after the text so far: llguidance's bitmask [ceil(V / 32)] int32."""
        mask = self._fill(np.empty_like(self.buffer))
        if not mask.any():
            raise PortableDGError("constraint: no token can continue the text here"
                                  f"{' (' + self.m.get_error() + ')' if self.m.get_error() else ''}")
        return mask

    def _fill(self, mask: np.ndarray) -> np.ndarray:
        self.m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        self.stats["masks"] += 1
        return mask

    def completes(self, tokens: list[int]) -> bool:
        """The tokens may follow the text so far and leave it complete."""
        if self.m.validate_tokens(tokens) != len(tokens):
            return False
        self.consume(tokens)
        complete = self.m.is_accepting()
        self.rollback(len(tokens))
        return complete

    def closing(self) -> list[int] | None:
        """Tokens that make the text so far complete (the grammar accepts it), or None if none found.

        A depth-first search over one-byte tokens: forced bytes are taken whole; otherwise the
        allowed bytes are tried class by class (`_BYTE_CLASSES`), except that where the search
        comes back, within 8 steps, to a state with the same allowed set (the same mask), it tries
        first the classes (closers and separators stay first), then the bytes, it took there least
        often: that ends repetitions such as [a-z]+, (ab)+ or ([0-9],)+.  Where no one-byte token
        is allowed, tokens of any length, shortest first.  It backs up at dead ends; after 256
        steps it starts again counting returns over the whole path and for every class, which
        ends longer loops such as (x, )*, and gives up after 1024 more.  A state whose mask was met before tries the
        completion found from there first (checked: equal masks need not mean equal states).  The
        bytes found are retokenized into fewer tokens where the tokenizer has them.  Results are
        kept until the next commit."""
        key = tuple(self.path)
        if key not in self.closings:
            self.stats["plans"] += 1
            plan = next((p for p in (self._search(*settings) for settings in _PASSES) if p is not None), None)
            self.closings[key] = plan if plan is None else self._retokenized(plan)
        return self.closings[key]

    def _search(self, window: int, steady: bool, limit: int) -> list[int] | None:
        path: list[tuple[list[int], tuple]] = []        # (tokens, choice keys) at each depth
        states: list[tuple[int, tuple]] = []            # (depth, mask key) of the states met on the path
        taken: dict[tuple, int] = {}                    # choice keys -> times in the last `window` steps
        frames: list[Any] = []
        tries = 0
        while not self.m.is_accepting():
            moves = self._expand(path, states, taken, steady)
            if moves is None:                           # a known completion took it to the end
                break
            frames.append(moves)
            while frames and tries < limit:       # the next step: down a new branch, or back up
                move = next(frames[-1], None)
                if move is None:
                    frames.pop()
                    if path:
                        self.rollback(len(path[-1][0]))
                        _count(taken, path, -1, window)
                        path.pop()
                    while states and states[-1][0] > len(path):
                        states.pop()
                    continue
                tries += 1
                if self.m.validate_tokens(move[0]) == len(move[0]):
                    self.consume(move[0])
                    path.append(move)
                    _count(taken, path, +1, window)
                    break
            else:
                while path:
                    self.rollback(len(path.pop()[0]))
                return None
        plan = [t for tokens, _ in path for t in tokens]
        self.rollback(len(plan))
        ends = np.cumsum([0] + [len(tokens) for tokens, _ in path])
        if len(self.known) > _KNOWN_STATES:
            self.known.clear()
        for depth, state in states:                     # what completes each state met on the way
            self.known.setdefault(state, plan[ends[depth]:])
        return plan

    def _expand(self, path: list[tuple[list[int], tuple]], states: list[tuple[int, tuple]],
                taken: dict[tuple, int], steady: bool) -> Any:
        """The closing search at a new state: its next steps, best first, as (tokens, choice keys);
        or None after taking the path to a complete text with a completion known for this mask."""
        bridge = self.bridge
        forced = self.m.compute_ff_bytes()
        if forced and all(b in bridge.token_of_byte for b in forced):
            return iter([([bridge.token_of_byte[b] for b in forced], ())])
        words = self._fill(self.buffer).view(np.uint32)
        allowed = (words[bridge.byte_words] >> bridge.byte_shifts) & 1
        state = allowed.tobytes()                       # the allowed one-byte tokens stand for the state
        states.append((len(path), (state, int(words.sum(dtype=np.uint64)))))
        known = self.known.get(states[-1][1])
        if known is not None and self.completes(known):
            self.consume(known)
            path.append((known, ()))
            return None
        rows = np.flatnonzero(allowed)
        if taken.get((state,)):                         # been here on this path: least taken first
            rows = sorted(rows.tolist(), key=lambda i: _rank(taken, state, bridge.byte_classes[i],
                                                             bridge.byte_values[i], steady))
        if not len(rows):                               # no one-byte token fits: any token, shortest first
            ids = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:bridge.vocab_size])
            ids = ids[~np.isin(ids, list(bridge.eos_ids))]
            return iter([([int(i)], ((state,), (state, "token", int(i))))
                         for i in ids[np.argsort(bridge.token_lengths()[ids], kind="stable")][:16]])
        return (([int(bridge.byte_ids[i])], ((state,), (state, "class", bridge.byte_classes[i]),
                                              (state, "byte", bridge.byte_values[i]))) for i in rows)

    def _retokenized(self, plan: list[int]) -> list[int]:
        """The plan's bytes in fewer tokens, where the tokenizer has them and they complete the text too."""
        shorter = self.bridge.llt.tokenize_bytes(self.bridge.llt.decode_bytes(plan))
        return shorter if len(shorter) < len(plan) and self.completes(shorter) else plan


class CanvasConstraint:
    """One sequence's constraint state, carried across canvases (see the module docstring).

    `walk` proposes canvases that respect the constraint; `commit` advances over a committed one.
    `stats` counts the work done (walks, masks, closing searches, device choices, replaced tokens)."""

    def __init__(self, constraint: Constraint, bridge: TokenBridge, candidates: int = 16,
                 constrain_noise: bool = False):
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ConfigError(f"candidates must be a positive integer, got {candidates!r}")
        llg = _llguidance()
        self.constraint, self.bridge = constraint, bridge
        self.candidates = candidates            # K: top-K candidates per position the walk wants
        # Re-noised positions: False keeps the uniform noise the model was trained to read (the walk
        # reads the position as its likeliest allowed token); True writes allowed tokens there too.
        self.constrain_noise = constrain_noise
        self.matcher = llg.LLMatcher(bridge.llt, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"{constraint.kind}: {_one_line(self.matcher.get_error())}")
        self.finished = False                   # an EOS was committed: the text has ended
        self.committed = 0                      # tokens committed (EOS excluded)
        self.stats = dict(walks=0, masks=0, plans=0, device_choices=0, replaced=0)
        self._closings: dict[tuple, list[int] | None] = {}     # closing searches from the committed state
        self._known: dict[tuple, list[int]] = {}               # completions by mask key (see _Cursor.closing)

    @property
    def accepting(self) -> bool:
        """The committed text is complete: EOS may follow it (or did: `finished`).  At the end of a
        generation this says whether the output is a whole text of the language or was cut short."""
        return self.finished or self.matcher.is_accepting()

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
        root = self._closings.get(tuple(text))          # the walk's way to complete this text, which fit the budget
        self._closings.clear()
        if root is not None:
            self._closings[()] = root
        if end < len(ids):
            if not self.matcher.is_accepting():
                raise PortableDGError(f"constraint: EOS committed at canvas position {end}, where the text is "
                                      "not complete")
            self.finished = True

    def start(self, noise_ids: np.ndarray, uniforms: np.ndarray, budget_left: int | None = None) -> np.ndarray:
        """A canvas's starting canvas [L] int64 (before its first step): each noise id where the
        constraint allows it after the tokens to its left, else a uniformly random allowed token
        (as `walk` re-noises); `uniforms` [L] in [0, 1) drive that choice; `budget_left` as in `walk`."""
        noise_ids, uniforms = np.asarray(noise_ids, np.int64), np.asarray(uniforms, np.float64)
        if len(uniforms) != len(noise_ids):
            raise ValueError(f"start: {len(noise_ids)} noise ids but {len(uniforms)} uniforms")
        if self.finished or not self.constrain_noise:
            return noise_ids.copy()
        cursor = _Cursor(self.matcher, self.bridge, self.stats, self._closings, self._known)
        return self._walk(cursor, lambda j: _noise_choice(cursor, int(noise_ids[j]), float(uniforms[j])),
                          noise_ids, budget_left)

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
        else get a sample of the allowed top-K (each candidate checked, no mask), else the device's
        masked sample; other positions keep their noise id where it is allowed, else get a
        uniformly random allowed token (see `_noise_choice`).  argmax: the model's argmax where
        allowed, else the likeliest allowed candidate, else the device's masked argmax (what the
        sampler drafts, compares and commits).  EOS only where the text is complete; after the
        first EOS both keep the model's own tokens (sample or noise; argmax): they are padding."""
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
        cursor = _Cursor(self.matcher, self.bridge, self.stats, self._closings, self._known)

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
                ok = np.array([cursor.valid(int(t)) for t in topk_ids[j]])      # checks: cheaper than a mask
                if ok.any():
                    return int(topk_ids[j][ok][_inverse_cdf(topk_logits[j][ok], resample_uniform(uniforms[j]))])
                return device(j, cursor.mask(), "sample")
            if not self.constrain_noise:       # the walk goes on from the likeliest allowed token here
                return argmax_choice(j)
            return _noise_choice(cursor, int(noise_ids[j]), float(uniforms[j]))

        def argmax_choice(j: int) -> int:
            for i in np.argsort(-topk_logits[j], kind="stable"):                # likeliest allowed candidate
                if cursor.valid(int(topk_ids[j, i])):
                    return int(topk_ids[j, i])
            return device(j, cursor.mask(), "argmax")

        canvas = self._walk(cursor, sample_choice, model_canvas, budget_left)
        if not self.constrain_noise:
            canvas = np.where(accepted, canvas, noise_ids)          # the trained noise, where the model re-noises
        argmax = self._walk(cursor, argmax_choice, topk_ids[:, 0], budget_left)
        self.stats["replaced"] += int((canvas != model_canvas).sum() + (argmax != topk_ids[:, 0]).sum())
        return canvas, argmax

    def _walk(self, cursor: _Cursor, choose: Callable[[int], int], model_canvas: np.ndarray,
              budget_left: int | None) -> np.ndarray:
        """One walk over the canvas from the committed state; the matcher is put back after."""
        out = np.array(model_canvas, np.int64)
        try:
            end = self._run(cursor, choose, out, 0, None, budget_left)
            if end is None and budget_left is not None:
                start, plan = self._closable(cursor, out, budget_left)
                if start < len(out):
                    end = self._run(cursor, choose, out, start, plan, budget_left)
        finally:
            cursor.rollback(cursor.depth)
        if end is not None:
            out[end + 1:] = model_canvas[end + 1:]
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
                    after = plan if plan and len(plan) <= left and cursor.completes(plan) else cursor.closing()
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
            if plan is not None:
                cursor.closings[tuple(cursor.path)] = plan
        return None

    def _closable(self, cursor: _Cursor, out: np.ndarray, budget_left: int) -> tuple[int, list[int] | None]:
        """Where the walk must re-run under the budget: (position, a plan from there), moving the cursor
        back to that position; (len(out), None) when the text as walked can still be completed in time."""
        L = len(out)
        plan = cursor.closing()
        if plan is None or len(plan) <= budget_left - L:
            return L, None                              # fits (or no way to complete found: nothing to steer by)
        best, misses = (L, plan), 0
        for j in range(L - 1, -1, -1):
            cursor.rollback(1)
            plan = cursor.closing()
            if plan is None:
                misses += 1
                if misses > _SCAN_MISSES:
                    break
                continue
            if len(plan) <= budget_left - j:
                return j, plan
            if len(plan) - (budget_left - j) < len(best[1]) - (budget_left - best[0]):
                best = (j, plan)
        cursor.rollback(cursor.depth)
        cursor.consume(out[:best[0]])                   # nowhere fits: follow the closest way to a complete text
        return best
