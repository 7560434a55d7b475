"""Host cost of constrained denoising at the released vocabulary (262,144 tokens).

    .venv/bin/python bench/constraints_speed.py [--vocab 262144] [--canvas 256] [--steps 8] [--canvases 4]
                                                [--seeds 3] [--workdir DIR]

A synthetic byte-level BPE tokenizer of --vocab tokens is trained once with the `tokenizers`
library (about 20 s; kept in --workdir).  For a JSON Schema, any JSON object, a regular
expression and a Lark grammar it measures:

* mask time per position: llguidance's mask at every position of a valid text, and the sum over
  --canvas consecutive positions (what masking every canvas position each step would cost);
* the walk (`CanvasConstraint.walk`, both walks: sample and argmax) per denoising step, on
  --canvases canvases of --canvas positions, --steps steps each, the last one ending the budget:
  host time, masks, closing searches and device choices (masked_choice calls) per step.  Two
  stand-in models.  "good": its argmax is a valid text (a confident model), which it samples 90%
  of the time, else another of its top-16 candidates; "random": random tokens everywhere, the
  worst case (nearly every position is refused).  Other candidates and noise ids are random.

masked_choice runs on the host here (the stand-in's text token where allowed, else a random
allowed id): on a real backend it is a masked argmax or sample of one row on the device; its
calls are counted and their time is left out of the walk's.
Numbers are medians with [10th..90th percentile] over steps; the machine is shared, so expect noise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from portable_dg.constraints import (CanvasConstraint, clear_ids, make_constraint, mask_allows, nth_allowed,
                                     popcount, token_bridge)
from portable_dg.tokenizer import Tokenizer

EOS = 1
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "status": {"enum": ["draft", "review", "final"]},
        "authors": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                           "affiliation": {"type": "object", "properties": {
                               "institution": {"type": "string"}, "country": {"type": "string"}},
                               "required": ["institution", "country"]}},
            "required": ["name", "email", "affiliation"]}},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["title", "year", "status", "authors", "scores"],
}
REGEX = r"([A-Z][a-z]+ ){1,3}\((19|20)[0-9]{2}\)(, ([A-Z][a-z]+ ){1,3}\((19|20)[0-9]{2}\))*\."
LARK = """start: stmt+
stmt: NAME "=" expr ";" " "?
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | NAME | "(" expr ")"
NAME: /[a-z][a-z0-9_]*/
NUMBER: /[0-9]+/
"""


def synthetic_corpus(rng: np.random.Generator, lines: int):
    """Text, JSON and code over a made-up lexicon with Greek, Cyrillic and CJK words: enough distinct
    words for BPE to reach a 262,144-token vocabulary."""
    consonants = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "qu", "st", "pr", "tr"]
    vowels = list("aeiouy") + ["ai", "ea", "ou", "io", "é", "ü", "ø"]
    scripts = ["αβγδεζηθικλμνξοπρστυφχψω", "абвгдежзийклмнопрстуфхцчшщыэюя",
               "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"]
    lexicon = list({"".join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
                            for _ in range(rng.integers(1, 5))) for _ in range(400_000)})
    lexicon += ["".join(rng.choice(list(s), rng.integers(2, 6))) for s in scripts for _ in range(20_000)]
    for _ in range(lines):
        words = [lexicon[i] for i in rng.integers(0, len(lexicon), 4000)]
        text = " ".join(w.capitalize() if rng.random() < 0.2 else w for w in words)
        doc = json.dumps({words[0]: [int(rng.integers(100000)), round(float(rng.random()), 4), words[1]], "ok": True})
        code = f"    def {words[2]}(self, {words[3]}={rng.integers(1000)}):\n        return [{words[4]}]\n"
        yield f"{text}\n{doc}\n{code}"


def synthetic_tokenizer(vocab_size: int, workdir: Path) -> Tokenizer:
    """A byte-level BPE tokenizer of vocab_size tokens (<pad>, <eos>, <bos> first), trained once."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    path = workdir / f"bpe-{vocab_size}.json"
    if not path.exists():
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(synthetic_corpus(np.random.default_rng(0), 300), trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        workdir.mkdir(parents=True, exist_ok=True)
        hf.save(str(path))
    return Tokenizer(HFTokenizer.from_file(str(path)), "tokenizers", special_ids=[0, 1, 2])


def valid_text(kind: str, rng: np.random.Generator, min_chars: int) -> str:
    """A random text of the constraint's language, at least min_chars long."""
    words = ["Alder", "Brook", "Cedar", "Dune", "Ember", "Fjord", "Grove", "Heath", "Isle", "Juniper"]

    def name() -> str:
        return " ".join(str(w) for w in rng.choice(words, rng.integers(1, 4)))
    if kind in ("json_schema", "json_object"):
        authors = [{"name": name(), "email": f"{name().split()[0].lower()}@example.org",
                    "affiliation": {"institution": name() + " University", "country": str(rng.choice(words))}}
                   for _ in range(max(1, min_chars // 120))]
        return json.dumps({"title": name() + " of " + name(), "year": int(rng.integers(1900, 2100)),
                           "status": str(rng.choice(["draft", "review", "final"])), "authors": authors,
                           "scores": [round(float(x), 3) for x in rng.normal(size=5)]})
    if kind == "regex":
        parts = [f"{name()} ({rng.integers(1900, 2100)})" for _ in range(max(1, min_chars // 20))]
        return ", ".join(parts) + "."
    return " ".join(f"x{i}=({rng.integers(100)}+y{i})*{rng.integers(9)}-z;" for i in range(max(1, min_chars // 20)))


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """median [p10..p90] of values * scale."""
    v = np.asarray(values, np.float64) * scale
    lo, mid, hi = np.percentile(v, [10, 50, 90])
    return f"{mid:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"


def mask_times(state: CanvasConstraint, ids: list[int], canvas: int) -> tuple[list[float], list[float]]:
    """(seconds per mask at each position of ids, seconds per `canvas` consecutive masks)."""
    matcher = state.matcher
    mask = np.zeros((state.bridge.vocab_size + 31) // 32, np.int32)
    per_position = []
    for t in ids:
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        per_position.append(time.perf_counter() - start)
        if not matcher.consume_tokens([t]):
            raise SystemExit(f"reference text refused: {matcher.get_error()[:200]}")
    matcher.rollback(len(ids))
    per_step = [sum(per_position[i:i + canvas]) for i in range(0, len(per_position) - canvas + 1, canvas // 2)]
    return per_position, per_step


class DeviceChoice:
    """masked_choice of a stand-in model: its text's token where allowed, else a random allowed id
    (EOS only where nothing else is allowed).  Counts its own time: a device does this work."""

    def __init__(self, target: np.ndarray | None, rng: np.random.Generator):
        self.target, self.rng, self.seconds = target, rng, 0.0

    def __call__(self, j: int, allowed: np.ndarray, kind: str) -> int:
        start = time.perf_counter()
        if self.target is not None and mask_allows(allowed, self.target[j:j + 1])[0]:
            choice = int(self.target[j])
        else:
            text = clear_ids(allowed, [EOS])
            allowed = text if text.any() else allowed
            choice = nth_allowed(allowed, int(self.rng.integers(popcount(allowed).sum(dtype=np.int64))))
        self.seconds += time.perf_counter() - start
        return choice


def walk_steps(bridge, constraint, ref: list[int], model: str, seed: int, L: int, steps: int,
               canvases: int, K: int = 16) -> list[dict]:
    """Per-step records (seconds, masks, plans, device choices) of a constrained generation."""
    rng = np.random.default_rng(seed)
    V = bridge.vocab_size
    state = CanvasConstraint(constraint, bridge, candidates=K)
    records, done = [], 0
    for block in range(canvases):
        for step in range(steps):
            topk = rng.integers(3, V, (L, K))
            target = np.asarray(ref[done:done + L] + [EOS] * max(0, done + L - len(ref)))
            if model == "good":                         # its argmax is the text; it samples that 90% of the time
                topk[:, 0] = target
            logits = np.sort(rng.normal(size=(L, K)) * 2, axis=1)[:, ::-1]
            sampled = np.where(rng.random(L) < 0.9, topk[:, 0], topk[np.arange(L), rng.integers(1, K, L)])
            accepted = rng.random(L) < 0.3 + 0.7 * (step + 1) / steps
            uniforms, noise = rng.random(L), rng.integers(0, V, L)
            before = dict(state.stats)
            device = DeviceChoice(target if model == "good" else None, rng)
            start = time.perf_counter()
            canvas, argmax = state.walk(sampled, accepted, topk, logits, uniforms, noise, device,
                                        budget_left=(canvases - block) * L)
            seconds = time.perf_counter() - start - device.seconds
            records.append(dict(seconds=seconds, block=block, **{k: state.stats[k] - before[k] for k in before}))
        text = argmax.tolist()
        state.commit(text)
        done += text.index(EOS) if EOS in text else L
        if state.finished:
            break
    records[-1]["complete"] = state.accepting
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--canvases", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pdg-constraints-bench")
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizer = synthetic_tokenizer(args.vocab, args.workdir)
    print(f"tokenizer: {tokenizer.vocab_size} tokens ({time.perf_counter() - start:.1f} s, {args.workdir})")
    start = time.perf_counter()
    bridge = token_bridge(tokenizer, args.vocab, [EOS])
    print(f"bridge to llguidance: {time.perf_counter() - start:.2f} s (once per tokenizer)\n")

    kinds = [("json_schema", dict(json_schema=SCHEMA)), ("json_object", dict(json_object=True)),
             ("regex", dict(regex=REGEX)), ("grammar", dict(grammar=LARK))]
    L = args.canvas
    print(f"| constraint | compile ms | mask us/position | mask ms per {L} positions | model "
          "| walk ms/step | masks/step | device choices/step "
          "| last canvas: walk ms/step | masks/step | closing searches/step | device choices/step | complete |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, spec in kinds:
        start = time.perf_counter()
        constraint = make_constraint(**spec)
        state = CanvasConstraint(constraint, bridge)
        compiled = (time.perf_counter() - start) * 1e3
        rng = np.random.default_rng(0)
        ref = tokenizer.encode(valid_text(kind, rng, 6 * L * args.canvases))
        per_position, per_step = mask_times(state, ref, L)
        for model in ("good", "random"):
            records = [r for seed in range(args.seeds)
                       for r in walk_steps(bridge, constraint, ref, model, seed, L, args.steps, args.canvases)]
            far = [r for r in records if r["block"] < args.canvases - 1] or records
            last = [r for r in records if r["block"] == args.canvases - 1] or records
            complete = sum(1 for r in records if r.get("complete"))
            print(f"| {kind} | {compiled:.1f} | {spread(per_position, 1e6, 1)} | {spread(per_step, 1e3)} | {model} "
                  f"| {spread([r['seconds'] for r in far], 1e3, 1)} | {spread([r['masks'] for r in far], digits=0)} "
                  f"| {spread([r['device_choices'] for r in far], digits=0)} "
                  f"| {spread([r['seconds'] for r in last], 1e3, 1)} | {spread([r['masks'] for r in last], digits=0)} "
                  f"| {spread([r['plans'] for r in last], digits=0)} "
                  f"| {spread([r['device_choices'] for r in last], digits=0)} | {complete}/{args.seeds} |", flush=True)
    print(f"\nmedian [p10..p90]; walk: both walks of one step, {args.canvases} canvases x {args.steps} steps "
          f"x {args.seeds} seeds, the budget ending with the last canvas")


if __name__ == "__main__":
    main()
