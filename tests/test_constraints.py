"""Constrained denoising (portable_dg/constraints.py): walks over canvases of random logits.

A random "model" stands in for the device (the guarantee must not depend on the model): each
step draws random logits, samples them, accepts a random subset, and hands the walk what the
sampler will hand it.  Every canvas the walk returns is checked against the constraint (via a
second llguidance matcher over the committed text), every commit too, and the final texts with
independent parsers: json + jsonschema, Python's re, and Lark.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
lark = pytest.importorskip("lark")

from portable_dg.constraints import (CanvasConstraint, make_constraint, mask_allows,  # noqa: E402
                                     nth_allowed, resample_uniform, token_bridge)
from portable_dg.errors import ConfigError, PortableDGError  # noqa: E402
from portable_dg.tokenizer import Tokenizer  # noqa: E402
from bpe import ARITHMETIC, ARITHMETIC_GBNF, DATE, ORDER, PERSON, SETTINGS, SLUG, train_bpe  # noqa: E402

SEEDS = range(50)
EOS = 1
K = 8

@pytest.fixture(scope="module")
def bpe() -> tuple[Tokenizer, int]:
    """A byte-level BPE tokenizer trained here (about 600 tokens) and a model vocabulary 4 ids larger."""
    hf = train_bpe()
    return Tokenizer(hf, "tokenizers", special_ids=[0, 1, 2]), hf.get_vocab_size() + 4


@dataclass
class Result:
    ids: list[int]              # generated ids, cut at the first EOS
    text: str
    accepting: bool
    ended: bool                 # an EOS was committed
    state: CanvasConstraint


class Oracle:
    """A second matcher over the committed text: checks what the walk returns."""

    def __init__(self, state: CanvasConstraint):
        import llguidance

        self.m = llguidance.LLMatcher(state.bridge.llt, state.constraint.grammar, log_level=0)
        self.text_vocab = state.bridge.vocab_size

    def check(self, canvas: np.ndarray, where: str) -> tuple[list[int], bool]:
        """(the canvas's text up to its first EOS, whether it has one); fails unless it is a valid
        continuation of the committed text, complete where it has an EOS."""
        ids = [int(t) for t in canvas]
        end = next((j for j, t in enumerate(ids) if t == EOS), len(ids))
        text = ids[:end]
        assert self.m.validate_tokens(text) == len(text), f"{where}: invalid at {self.m.validate_tokens(text)}"
        if end < len(ids):
            self.m.consume_tokens(text)
            complete = self.m.is_accepting()
            self.m.rollback(len(text))
            assert complete, f"{where}: EOS at {end} where the text is incomplete"
        return text, end < len(ids)


def masked_choice_from(logits: np.ndarray, uniforms: np.ndarray):
    """The sampler's masked_choice on the host: row j of the logits restricted to the allowed ids."""
    V = logits.shape[1]

    def choose(j: int, allowed: np.ndarray, kind: str) -> int:
        ok = mask_allows(allowed, np.arange(V))
        row = np.where(ok, logits[j], -np.inf)
        if kind == "argmax":
            return int(np.argmax(row))
        cdf = np.cumsum(np.exp(row - row.max()))
        return int(min(np.searchsorted(cdf, resample_uniform(uniforms[j]) * cdf[-1], side="right"), V - 1))
    return choose


def denoise(bridge, constraint, seed: int, *, L: int = 16, canvases: int = 5, steps: int = 2,
            eos_bias: float = 2.0, budget: bool = True, on_walk=None, constrain_noise: bool = False) -> Result:
    """Generate with random logits: `canvases` canvases of `steps` walks each, the last argmax
    committed; checks every walk's canvases and every commit.  Without constrain_noise the
    re-noised positions keep their noise ids (checked) and the other canvas tokens are checked
    through the argmax walk that commits."""
    rng = np.random.default_rng(seed)
    state = CanvasConstraint(constraint, bridge, candidates=K, constrain_noise=constrain_noise)
    oracle = Oracle(state)
    V = bridge.vocab_size
    ids: list[int] = []
    ended = False
    for block in range(canvases):
        budget_left = (canvases - block) * L if budget else None
        start_noise = rng.integers(0, V, L)
        start = state.start(start_noise, rng.random(L), budget_left)
        if constrain_noise:
            oracle.check(start, f"seed {seed} start {block}")
        else:
            np.testing.assert_array_equal(start, start_noise)
        for step in range(steps):
            logits = rng.normal(size=(L, V)) * 3.0
            logits[:, EOS] += eos_bias
            uniforms = rng.random(L)
            cdf = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)
            sampled = np.minimum((cdf <= uniforms[:, None] * cdf[:, -1:]).sum(axis=1), V - 1)
            accepted = rng.random(L) < (step + 1) / steps
            topk = np.argsort(-logits, axis=1, kind="stable")[:, :K]
            noise = rng.integers(0, V, L)
            walk_args = (sampled, accepted, topk, np.take_along_axis(logits, topk, 1), uniforms, noise)
            canvas, argmax = state.walk(*walk_args, masked_choice_from(logits, uniforms), budget_left=budget_left)
            if constrain_noise:
                oracle.check(canvas, f"seed {seed} canvas {block} step {step} (sample)")
            else:
                np.testing.assert_array_equal(canvas[~accepted], noise[~accepted])
            oracle.check(argmax, f"seed {seed} canvas {block} step {step} (argmax)")
            if on_walk is not None:
                on_walk(oracle, walk_args, canvas, argmax)
        text, ended = oracle.check(argmax, f"seed {seed} commit {block}")
        state.commit(argmax)
        oracle.m.consume_tokens(text)
        ids += text
        if ended:
            break
    assert state.accepting == (ended or oracle.m.is_accepting())
    return Result(ids, bridge.llt.decode_str(ids), state.accepting, ended, state)


@pytest.mark.parametrize("schema", [PERSON, ORDER, SETTINGS], ids=["person", "order", "settings"])
def test_json_schema_outputs_validate(bpe, schema):
    tokenizer, V = bpe
    bridge = token_bridge(tokenizer, V, [EOS])
    constraint = make_constraint(json_schema=schema)
    for seed in SEEDS:
        out = denoise(bridge, constraint, seed)
        assert out.accepting, f"seed {seed}: incomplete {out.text!r}"
        jsonschema.validate(json.loads(out.text), schema)
        assert max(out.ids) < tokenizer.vocab_size              # never an id past the tokenizer


def test_any_json_object(bpe):
    tokenizer, V = bpe
    constraint = make_constraint(json_object=True)
    endings = set()
    for seed in SEEDS:
        out = denoise(token_bridge(tokenizer, V, [EOS]), constraint, seed)
        assert out.accepting and isinstance(json.loads(out.text), dict), f"seed {seed}: {out.text!r}"
        endings.add(out.ended)
    assert endings == {True, False}     # some texts end with the model's EOS, others with the budget


@pytest.mark.parametrize("pattern", [DATE, SLUG], ids=["date", "slug"])
def test_regex_outputs_match(bpe, pattern):
    tokenizer, V = bpe
    constraint = make_constraint(regex=pattern)
    for seed in SEEDS:
        out = denoise(token_bridge(tokenizer, V, [EOS]), constraint, seed)
        assert out.accepting and re.fullmatch(pattern, out.text), f"seed {seed}: {out.text!r}"


@pytest.mark.parametrize("grammar", [ARITHMETIC, ARITHMETIC_GBNF], ids=["lark", "gbnf"])
def test_grammar_outputs_parse(bpe, grammar):
    tokenizer, V = bpe
    parser = lark.Lark(ARITHMETIC)
    constraint = make_constraint(grammar=grammar)
    seeds = SEEDS if grammar is ARITHMETIC else range(10)
    for seed in seeds:
        out = denoise(token_bridge(tokenizer, V, [EOS]), constraint, seed)
        assert out.accepting, f"seed {seed}: {out.text!r}"
        parser.parse(out.text)


@pytest.mark.parametrize("constraint", [dict(json_schema=PERSON), dict(json_schema=SETTINGS), dict(regex=SLUG),
                                        dict(grammar=ARITHMETIC)], ids=["person", "settings", "slug", "arithmetic"])
def test_budget_ending_mid_structure_closes_the_text(bpe, constraint):
    """A model that never writes EOS: every text ends with the budget, and the walk closes it in time."""
    tokenizer, V = bpe
    c = make_constraint(**constraint)
    for seed in range(10):
        out = denoise(token_bridge(tokenizer, V, [EOS]), c, seed, L=12, canvases=6, eos_bias=-30.0)
        assert out.accepting, f"seed {seed}: {out.text!r}"
        if "json_schema" in constraint:
            jsonschema.validate(json.loads(out.text), constraint["json_schema"])
        elif "regex" in constraint:
            assert re.fullmatch(constraint["regex"], out.text)
        else:
            lark.Lark(ARITHMETIC).parse(out.text)


def test_budget_too_small_for_any_text_reports_incomplete(bpe):
    """PERSON needs more than 8 tokens: the text is a valid prefix, as close to complete as the search
    found, and says it is incomplete."""
    tokenizer, V = bpe
    c = make_constraint(json_schema=PERSON)
    for seed in range(5):
        out = denoise(token_bridge(tokenizer, V, [EOS]), c, seed, L=8, canvases=1)
        assert not out.accepting and not out.ended
        assert out.text.startswith('{"name"')       # the closing path: forced key first


def test_walk_keeps_every_allowed_model_token(bpe):
    """Without a budget in sight, a position keeps the model's token whenever it is allowed after the
    walked tokens to its left (noise EOS aside: noise never ends the text while more may follow)."""
    tokenizer, V = bpe
    kept = [0, 0]

    def check(oracle, walk_args, canvas, argmax):
        sampled, accepted, topk, _, _, noise = walk_args
        for out, model in ((canvas, np.where(accepted, sampled, noise)), (argmax, topk[:, 0])):
            for j, t in enumerate(model.tolist()):
                prefix = [int(x) for x in out[:j]]
                if EOS in prefix:
                    assert out[j] == t              # after the EOS: the model's own tokens
                    continue
                if t == EOS and not (accepted[j] or out is argmax):
                    continue                        # noise EOS: kept only where nothing else may follow
                if t == EOS:
                    oracle.m.consume_tokens(prefix)
                    allowed = oracle.m.is_accepting()
                    oracle.m.rollback(len(prefix))
                else:
                    allowed = oracle.m.validate_tokens(prefix + [t]) == j + 1
                assert (out[j] == t) == allowed, f"position {j}: model token {t}, allowed {allowed}, wrote {out[j]}"
                kept[out is argmax] += allowed

    for seed in range(10):
        denoise(token_bridge(tokenizer, V, [EOS]), make_constraint(json_object=True), seed, budget=False,
                on_walk=check, constrain_noise=True)
    assert min(kept) > 50


@pytest.mark.parametrize("constraint", [dict(json_schema=ORDER), dict(json_object=True), dict(regex=DATE),
                                        dict(grammar=ARITHMETIC)], ids=["order", "object", "date", "arithmetic"])
def test_constrained_noise_writes_only_allowed_tokens(bpe, constraint):
    """constrain_noise: re-noised positions and starting canvases hold allowed tokens too (every
    canvas checked by the oracle inside `denoise`), and the texts are still whole."""
    tokenizer, V = bpe
    c = make_constraint(**constraint)
    for seed in range(10):
        assert denoise(token_bridge(tokenizer, V, [EOS]), c, seed, constrain_noise=True).accepting


def test_walk_is_deterministic(bpe):
    tokenizer, V = bpe
    c = make_constraint(json_schema=ORDER)
    runs = [denoise(token_bridge(tokenizer, V, [EOS]), c, 7) for _ in range(2)]
    assert runs[0].ids == runs[1].ids
    assert runs[0].ids != denoise(token_bridge(tokenizer, V, [EOS]), c, 8).ids


def test_bridge_is_built_once_per_tokenizer(bpe):
    tokenizer, V = bpe
    assert token_bridge(tokenizer, V, [EOS]) is token_bridge(tokenizer, V, [EOS])
    assert token_bridge(tokenizer, V, [EOS, 2]) is not token_bridge(tokenizer, V, [EOS])
    with pytest.raises(ConfigError, match="more than the model's vocabulary"):
        token_bridge(tokenizer, 10, [EOS])
    with pytest.raises(ConfigError, match="EOS"):
        token_bridge(tokenizer, V, [])


def test_sudoku_tokenizer_regex_fixes_the_givens():
    """The bundled Sudoku model's WordLevel tokenizer (which llguidance cannot read by itself) goes
    through the token table; a regex with the givens fixed holds on its 81-token canvas."""
    from portable_dg import sudoku

    tokenizer = Tokenizer.from_directory(sudoku.default_model_path())
    bridge = token_bridge(tokenizer, tokenizer.vocab_size, [EOS])
    puzzle = "".join(str(int(c)) for c in sudoku.make_puzzle(np.random.default_rng(0), 40)[0])
    pattern = "".join(c if c in "123456789" else "[1-9]" for c in puzzle)
    for seed in range(10):
        out = denoise(bridge, make_constraint(regex=pattern), seed, L=81, canvases=1, steps=3)
        assert out.accepting and re.fullmatch(pattern, out.text), out.text
        assert all(a == b for a, b in zip(out.text, puzzle) if b in "123456789")


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["yes no maybe", "the answer is yes", "no way, 42 times", "maybe 7"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
                                   minloglevel=2)
    tokenizer = Tokenizer.from_directory(tmp_path)
    bridge = token_bridge(tokenizer, tokenizer.vocab_size, [EOS])
    pattern = r" ?(yes|no|maybe)(, [0-9]+)*"
    for seed in range(10):
        out = denoise(bridge, make_constraint(regex=pattern), seed, L=8, canvases=2)
        assert out.accepting and re.fullmatch(pattern, out.text), out.text


@pytest.mark.parametrize("spec, message", [
    (dict(json_schema={"type": "objec"}), "json_schema: .*objec"),
    (dict(json_schema="{not json"), "json_schema: "),
    (dict(json_schema=[1, 2]), "json_schema: expected a JSON object"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "json_schema: "),
    (dict(regex="5[1-9"), "regex: .*unclosed character class"),
    (dict(regex=""), "regex: expected a non-empty string"),
    (dict(grammar='start: "a" b'), "grammar: .*unknown name"),
    (dict(grammar='root ::= "a'), "grammar: "),
    (dict(regex="a", grammar="start: \"a\""), "at most one of"),
])
def test_invalid_specs_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_constraint(**spec)
    assert "\n" not in str(info.value) and "^" not in str(info.value)


def test_no_constraint_is_none():
    assert make_constraint() is None and make_constraint(json_object=False) is None


def test_commit_refuses_a_canvas_that_breaks_the_constraint(bpe):
    tokenizer, V = bpe
    bridge = token_bridge(tokenizer, V, [EOS])
    state = CanvasConstraint(make_constraint(regex="[0-9]+"), bridge)
    with pytest.raises(PortableDGError, match="position 1"):
        state.commit(tokenizer.encode("1") + tokenizer.encode("x"))
    with pytest.raises(PortableDGError, match="EOS committed at canvas position 0"):
        state.commit([EOS, 0, 0])
    state.commit(tokenizer.encode("12") + [EOS, 0])
    assert state.finished and state.accepting
    with pytest.raises(PortableDGError, match="after the text ended"):
        state.commit(tokenizer.encode("3"))
    letters = np.array([tokenizer.encode(c)[0] for c in "abcd"])     # after the end: the model's own tokens
    canvas, argmax = state.walk(letters, np.ones(4, bool), letters[:, None], np.zeros((4, 1)), np.full(4, .5),
                                letters, lambda j, allowed, kind: 0)
    assert canvas.tolist() == argmax.tolist() == letters.tolist()


def test_masked_choice_outside_the_mask_is_refused(bpe):
    tokenizer, V = bpe
    state = CanvasConstraint(make_constraint(regex="[0-9]+"), token_bridge(tokenizer, V, [EOS]), candidates=2)
    letter = tokenizer.encode("x")[0]
    args = (np.full(4, letter), np.ones(4, bool), np.full((4, 2), letter), np.zeros((4, 2)), np.full(4, .5),
            np.full(4, letter))
    with pytest.raises(PortableDGError, match="outside the allowed set"):
        state.walk(*args, lambda j, allowed, kind: letter)
    assert not state.matcher.is_accepting()             # put back to the empty text, which [0-9]+ refuses
    canvas, argmax = state.walk(*args, lambda j, allowed, kind: nth_allowed(allowed, 0))
    digits = tokenizer.decode([int(t) for t in argmax[:list(argmax).index(EOS)] if EOS in argmax] or argmax)
    assert re.fullmatch("[0-9]+", digits) and not state.matcher.is_accepting()


def test_invalid_candidates():
    with pytest.raises(ConfigError, match="candidates"):
        CanvasConstraint(make_constraint(regex="a"), None, candidates=0)


def test_mask_helpers():
    mask = np.zeros(3, np.int32)
    mask.view(np.uint32)[:] = [1 << 5, 0, (1 << 31) | 1]
    assert mask_allows(mask, [5, 6, 64, 95]).tolist() == [True, False, True, True]
    assert [nth_allowed(mask, n) for n in range(3)] == [5, 64, 95]
    us = [resample_uniform(u) for u in np.linspace(0, 1, 1000, endpoint=False)]
    assert 0 <= min(us) and max(us) < 1 and abs(np.mean(us) - 0.5) < 0.05
