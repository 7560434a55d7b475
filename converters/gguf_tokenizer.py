"""The tokenizer inside a GGUF file: `tokenizer.ggml.*` keys (Gemma 4 `set_vocab`, spec §1.5).

Writing: a BPE `tokenizer.json` becomes tokens / scores / token types / merges exactly as llama.cpp's
converter writes them (`conversion/gemma.py` `Gemma4Model.set_vocab` over gguf-py's `LlamaHfVocab`
and `SpecialVocab`), plus the special ids and the chat template, plus the whole `tokenizer.json`
under `tokenizer.huggingface.json` (a gguf-py key llama.cpp ignores) so our own reader tokenizes
exactly like the checkpoint; a tokenizer of another kind (the Sudoku model's word-level one)
travels under that key alone.  The EOS ids are written with the model's keys, from the generation
config, tokenizer or not.
Reading: `tokenizer.huggingface.json` when present; otherwise a Gemma-style byte-fallback BPE rebuilt
from tokens and merges (the Unsloth files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from portable_dg.errors import ConfigError
from portable_dg.tokenizer import Tokenizer

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SCORE = -1000.0                     # LlamaHfVocab's score for every token (BPE ranks live in the merges)
HF_JSON = "tokenizer.huggingface.json"
SPECIAL_IDS = {  # key suffix -> token text of the Gemma vocabulary
    "bos_token_id": "<bos>", "eos_token_id": "<eos>", "unknown_token_id": "<unk>",
    "padding_token_id": "<pad>", "mask_token_id": "<mask>",
}
# Gemma 4's chat and tool tokens, forced to USER_DEFINED so llama.cpp renders them for its chat parser
VISIBLE_TOKENS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                            "<tool_response|>", '<|"|>'})
# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`)
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_CONTROL_LOOKING = re.compile(r"<\|[^<>]*>|<[^<>]*\|>")


def tokenizer_metadata(directory: Path, tokenizer: Tokenizer | None) -> dict[str, tuple[str, Any]]:
    """GGUF keys for the tokenizer of a checkpoint directory: key -> (gguf-py value type name, value).

    Empty when the directory has no `tokenizer.json`; a tokenizer that is not BPE (the Sudoku
    model's word-level one) travels only as tokenizer.huggingface.json, which llama.cpp cannot use."""
    path = directory / "tokenizer.json"
    if tokenizer is None or not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    spec = json.loads(text)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return {HF_JSON: ("STRING", text)}
    tokens, types = vocabulary(model["vocab"], spec.get("added_tokens", []), named_special_tokens(directory))
    meta: dict[str, tuple[str, Any]] = {
        "tokenizer.ggml.model": ("STRING", "gemma4"),
        "tokenizer.ggml.tokens": ("ARRAY:STRING", tokens),
        "tokenizer.ggml.scores": ("ARRAY:FLOAT32", [SCORE] * len(tokens)),
        "tokenizer.ggml.token_type": ("ARRAY:INT32", types),
        "tokenizer.ggml.add_bos_token": ("BOOL", True),
        "tokenizer.ggml.add_space_prefix": ("BOOL", False),
        HF_JSON: ("STRING", text),
    }
    merges = [merge_text(m) for m in model.get("merges", [])]
    if merges:
        meta["tokenizer.ggml.merges"] = ("ARRAY:STRING", merges)
    ids = {tok: i for i, tok in enumerate(tokens)}
    for key, tok in SPECIAL_IDS.items():
        if tok in ids:
            meta[f"tokenizer.ggml.{key}"] = ("UINT32", ids[tok])
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = ("STRING", tokenizer.chat_template)
    return meta


def vocabulary(base: Mapping[str, int], added: list[dict[str, Any]], named: set[str]) -> tuple[list[str], list[int]]:
    """(tokens, token types) in id order, by llama.cpp's rules for a Gemma 4 tokenizer:

    * the model's own vocabulary (ids below its size, special tokens included): `<0xNN>` byte tokens
      are BYTE, the tokenizer's *named* special tokens (bos, eos, unk, pad, mask, ... from
      tokenizer_config.json, as transformers' `all_special_ids`) are CONTROL, the rest NORMAL, even
      added tokens flagged special in tokenizer.json;
    * added tokens beyond the model's vocabulary: CONTROL if named special, else USER_DEFINED;
    * then Gemma 4's chat and tool tokens (`VISIBLE_TOKENS`) become USER_DEFINED whatever they were.
    Ids no token claims (llama.cpp's converter would stop there) are `[PAD{i}]`, UNUSED."""
    by_id = {int(i): tok for tok, i in base.items()}
    n_base = len(base)
    beyond = {int(t["id"]): t["content"] for t in added if int(t["id"]) >= n_base}
    text_of = {**by_id, **{int(t["id"]): t["content"] for t in added}}
    named_ids = {i for i, tok in text_of.items() if tok in named}
    tokens, types = [], []
    for i in range(max([n_base - 1, *text_of]) + 1):
        token = text_of.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if i in beyond:
            kind = CONTROL if token in named else USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(token):
            kind = BYTE
        else:
            kind = CONTROL if i in named_ids else NORMAL
        tokens.append(token)
        types.append(USER_DEFINED if token in VISIBLE_TOKENS else kind)
    return tokens, types


def named_special_tokens(directory: Path) -> set[str]:
    """The texts of transformers' `all_special_tokens` for tokenizer_config.json: the named special
    tokens (`bos_token` ... `mask_token`), any other `*_token` entry holding a token (model-specific
    ones such as `image_token`), and `extra_special_tokens` / `additional_special_tokens`."""
    path = directory / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        return set()
    named = {token_content(v) for k, v in config.items() if k in NAMED_SPECIAL or k.endswith("_token")}
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    named |= {token_content(v) for v in (extra.values() if isinstance(extra, dict) else extra)}
    return {t for t in named if t is not None}


def token_content(value: Any) -> str | None:
    """A token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        value = value.get("content")
    return value if isinstance(value, str) else None


def merge_text(merge: str | list[str]) -> str:
    """One merge as `SpecialVocab` writes it: "a b"; pairs with a space inside a part have that
    space written as U+0120 (its convention since transformers 4.45's pair format)."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)


def special_ids_of(tokens: list[str], types: list[int]) -> list[int]:
    """Token ids to treat as special when the tokenizer is rebuilt from tokens and types: CONTROL,
    and the Gemma control tokens (`<|...>`, `<...|>`) llama.cpp's rules leave NORMAL, but not the
    chat and tool tokens it renders."""
    return [i for i, (tok, kind) in enumerate(zip(tokens, types))
            if kind == CONTROL or (kind != BYTE and tok not in VISIBLE_TOKENS and _CONTROL_LOOKING.fullmatch(tok))]


def tokenizer_from_metadata(fields: Mapping[str, Any], source: str) -> Tokenizer | None:
    """A Tokenizer from a GGUF file's metadata (already decoded to Python values), or None."""
    tokens = fields.get("tokenizer.ggml.tokens")
    hf_json = fields.get(HF_JSON)
    if hf_json is None and not tokens:
        return None
    tokens = tokens if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else []
    types = fields.get("tokenizer.ggml.token_type")
    types = types if isinstance(types, list) and len(types) == len(tokens) else [NORMAL] * len(tokens)
    from tokenizers import Tokenizer as HFTokenizer
    try:
        backend = HFTokenizer.from_str(hf_json) if isinstance(hf_json, str) else _gemma_bpe(fields, tokens, types)
    except BaseException as e:  # tokenizers raises bare Exceptions, and pyo3 PanicExceptions, on bad input
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigError(f"{source}: cannot build the tokenizer from its metadata "
                          f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if backend is None:
        return None

    def text_of(key: str, default: str) -> str:
        i = fields.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else default
    template = fields.get("tokenizer.chat_template")
    return Tokenizer(backend, "tokenizers", template if isinstance(template, str) else None,
                     special_ids_of(tokens, types), text_of("bos_token_id", "<bos>"), text_of("eos_token_id", "<eos>"))


def _gemma_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    """Byte-fallback BPE with Gemma's "▁" space handling, from tokens + merges; None if no merges."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    merges = fields.get("tokenizer.ggml.merges") or []
    if not merges or not isinstance(merges, list):
        return None
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first id wins on duplicates

    def part(text: str) -> str:      # undo `merge_text`'s U+0120 for a space inside a part
        return text if text in vocab else text.replace("\u0120", " ")
    merges = [tuple(part(p) for p in m.split(" ", 1)) for m in merges if isinstance(m, str) and " " in m]
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                     unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None)
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = set(special_ids_of(tokens, types))
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types)
                    if t == USER_DEFINED and i not in special])
    return tok
