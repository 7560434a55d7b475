"""A byte-level BPE tokenizer trained in the tests (the `tokenizers` library) on JSON-like text,
and the constraints the constrained-output tests use (three JSON Schemas, two regular expressions,
one context-free grammar in Lark and GBNF)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "scores"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "status": {"enum": ["open", "paid", "shipped"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "gift": {"type": "boolean"},
    },
    "required": ["status", "items"],
    "additionalProperties": False,
}
SETTINGS = {
    "type": "object",
    "properties": {
        "version": {"enum": [1, 2, 3]},
        "limits": {"type": "object", "properties": {
            "cpu": {"type": "number", "minimum": 0, "maximum": 64},
            "tags": {"type": "array", "items": {"enum": ["fast", "safe", "cheap"]}, "maxItems": 3},
            "nested": {"type": "object",
                       "properties": {"on": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
                       "required": ["on", "note"], "additionalProperties": False}},
            "required": ["cpu", "tags", "nested"], "additionalProperties": False},
    },
    "required": ["version", "limits"],
    "additionalProperties": False,
}
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T[0-9]{2}:[0-9]{2}"
SLUG = r"[a-z]+(-[0-9]{2,4})+ (yes|no)"
ARITHMETIC = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
ARITHMETIC_GBNF = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""


def corpus(rng: np.random.Generator):
    """300 lines of JSON objects, arithmetic, codes and words."""
    words = ["alpha", "beta", "name", "age", "role", "address", "city", "zip", "scores", "admin", "user", "guest",
             "status", "items", "sku", "qty", "price", "gift", "open", "paid", "shipped", "version", "limits", "cpu",
             "tags", "nested", "on", "note", "fast", "safe", "cheap", "true", "false", "null"]
    for _ in range(300):
        doc = {str(rng.choice(words)): [int(rng.integers(1000)), round(float(rng.random()), 3), str(rng.choice(words))],
               "name": " ".join(rng.choice(words, 3)), "n": int(rng.integers(-50, 50)), "ok": bool(rng.random() < .5)}
        yield json.dumps(doc) + f" ({rng.integers(99)}+{rng.integers(9)})*4-5/6 AB-123 2024-01-31T12:30 " + \
            " ".join(rng.choice(words, 8))


def train_bpe(save_to: str | Path | None = None):
    """A byte-level BPE tokenizer of about 600 tokens (<pad> 0, <eos> 1, <bos> 2), trained on
    `corpus`; saved as tokenizer.json into `save_to` when given."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus(np.random.default_rng(0)), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if save_to is not None:
        hf.save(str(Path(save_to) / "tokenizer.json"))
    return hf
