"""llguidance against xgrammar at the released vocabulary: why portable_dg constrains with llguidance.

    pip install llguidance==1.9.1 && pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
    .venv/bin/python bench/constraints_libraries.py [--vocab 262144] [--repeats 6] [--workdir DIR]

(xgrammar declares torch, transformers and triton as dependencies; install it without them where
torch is already there, never in the `constrain` extra.)  Both libraries get the same synthetic
byte-level BPE tokenizer (bench/constraints_speed.py) and the same texts; for a JSON Schema, any
JSON object, a regular expression and a context-free grammar (Lark for llguidance, the same rules
in EBNF for xgrammar) it reports the tokenizer bridge, grammar compile time, the mask at every
position of a valid text (cold: the first pass; warm: the next passes, as a canvas walked again
every step sees it) and the cost of checking-and-consuming one token.  One thread each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from constraints_speed import LARK, REGEX, SCHEMA, synthetic_tokenizer, valid_text

EOS = 1
EBNF = """root ::= stmt+
stmt ::= name "=" expr ";" " "?
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | name | "(" expr ")"
name ::= [a-z] [a-z0-9_]*
number ::= [0-9]+
"""
KINDS = ("json_schema", "json_object", "regex", "grammar")


def microseconds(values: list[float]) -> str:
    v = np.asarray(values) * 1e6
    return f"{np.median(v):.1f} [{np.percentile(v, 10):.1f}..{np.percentile(v, 90):.1f}], max {v.max():.0f}"


def measure(name: str, compile_grammar, new_matcher, fill_mask, consume, reset, texts: dict[str, list[int]],
            repeats: int, mask: np.ndarray) -> None:
    for kind in KINDS:
        start = time.perf_counter()
        matcher = new_matcher(compile_grammar(kind))
        compiled = (time.perf_counter() - start) * 1e3
        cold, warm, consumed = [], [], []
        for rep in range(repeats):
            reset(matcher)
            for t in texts[kind]:
                start = time.perf_counter()
                fill_mask(matcher, mask)
                (cold if rep == 0 else warm).append(time.perf_counter() - start)
                if not (mask.reshape(-1).view(np.uint32)[t >> 5] >> (t & 31)) & 1:
                    raise SystemExit(f"{name}: token {t} of the {kind} text not in its mask")
                start = time.perf_counter()
                if not consume(matcher, t):
                    raise SystemExit(f"{name}: token {t} of the {kind} text refused")
                consumed.append(time.perf_counter() - start)
        print(f"| {name} | {kind} | {compiled:.1f} | {microseconds(cold)} | {microseconds(warm)} "
              f"| {microseconds(consumed)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pdg-constraints-bench")
    args = parser.parse_args()
    tokenizer = synthetic_tokenizer(args.vocab, args.workdir)
    rng = np.random.default_rng(0)
    texts = {kind: tokenizer.encode(valid_text(kind, rng, 400)) for kind in KINDS}
    mask = np.zeros((1, (args.vocab + 31) // 32), np.int32)
    print("| library | constraint | compile ms (to a matcher) | mask us, cold | mask us, warm | check+consume us |")
    print("|---|---|---|---|---|---|")

    import llguidance as llg
    start = time.perf_counter()
    llt = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=args.vocab, eos_token=[EOS])
    print(f"llguidance bridge: {time.perf_counter() - start:.2f} s")
    sources = {"json_schema": lambda: llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)),
               "json_object": lambda: llg.LLMatcher.grammar_from_json_schema('{"type": "object"}'),
               "regex": lambda: llg.LLMatcher.grammar_from_regex(REGEX),
               "grammar": lambda: llg.LLMatcher.grammar_from_lark(LARK)}
    measure("llguidance 1.9.1", lambda kind: sources[kind](), lambda g: llg.LLMatcher(llt, g, log_level=0),
            lambda m, out: m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes),
            lambda m, t: m.consume_token(t), lambda m: m.reset(), texts, args.repeats, mask)

    try:
        import torch
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise SystemExit(f"xgrammar not measured: {e}") from None
    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend,
                                                                      eos_token="<eos>"),
                                              vocab_size=args.vocab, stop_token_ids=[EOS])
    print(f"xgrammar bridge: {time.perf_counter() - start:.2f} s")
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    sources = {"json_schema": lambda: compiler.compile_json_schema(json.dumps(SCHEMA)),
               "json_object": lambda: compiler.compile_json_schema('{"type": "object"}'),
               "regex": lambda: compiler.compile_regex(REGEX),
               "grammar": lambda: compiler.compile_grammar(EBNF)}
    tensor = torch.from_numpy(mask)
    measure("xgrammar 0.2.8", lambda kind: sources[kind](), xgr.GrammarMatcher,
            lambda m, out: m.fill_next_token_bitmask(tensor), lambda m, t: m.accept_token(t),
            lambda m: m.reset(), texts, args.repeats, mask)


if __name__ == "__main__":
    main()
