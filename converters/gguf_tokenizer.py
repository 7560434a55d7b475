"""The tokenizer inside a GGUF file: `tokenizer.ggml.*` keys (Gemma 4 `set_vocab`, spec §1.5).

Writing: a BPE `tokenizer.json` becomes tokens / scores / token types / merges, the special ids and
the chat template, plus the whole `tokenizer.json` under `tokenizer.huggingface.json` (a gguf-py key
llama.cpp ignores) so our own reader tokenizes exactly like the checkpoint; a tokenizer of another
kind (the Sudoku model's word-level one) travels under that key alone.  The EOS ids are written
with the model's keys, from the generation config, tokenizer or not.
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
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
HF_JSON = "tokenizer.huggingface.json"
SPECIAL_IDS = {  # key suffix -> token text of the Gemma vocabulary
    "bos_token_id": "<bos>", "eos_token_id": "<eos>", "unknown_token_id": "<unk>",
    "padding_token_id": "<pad>", "mask_token_id": "<mask>",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    vocab: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
    vocab.update({i: t["content"] for i, t in added.items()})
    n = max(vocab) + 1
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(n)]
    types = [_token_type(i, tokens[i], added) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, tuple[str, Any]] = {
        "tokenizer.ggml.model": ("STRING", "gemma4"),
        "tokenizer.ggml.pre": ("STRING", "gemma4"),
        "tokenizer.ggml.tokens": ("ARRAY:STRING", tokens),
        "tokenizer.ggml.scores": ("ARRAY:FLOAT32", [0.0] * n),  # BPE ranks live in the merges
        "tokenizer.ggml.token_type": ("ARRAY:INT32", types),
        "tokenizer.ggml.add_bos_token": ("BOOL", True),
        "tokenizer.ggml.add_space_prefix": ("BOOL", False),
        HF_JSON: ("STRING", text),
    }
    if merges:
        meta["tokenizer.ggml.merges"] = ("ARRAY:STRING", merges)
    ids = {tok: i for i, tok in enumerate(tokens)}
    for key, tok in SPECIAL_IDS.items():
        if tok in ids:
            meta[f"tokenizer.ggml.{key}"] = ("UINT32", ids[tok])
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = ("STRING", tokenizer.chat_template)
    return meta


def _token_type(i: int, token: str, added: Mapping[int, dict]) -> int:
    if i in added:
        return CONTROL if added[i].get("special") else USER_DEFINED
    return BYTE if _BYTE_TOKEN.fullmatch(token) else NORMAL


def tokenizer_from_metadata(fields: Mapping[str, Any], source: str) -> Tokenizer | None:
    """A Tokenizer from a GGUF file's metadata (already decoded to Python values), or None."""
    tokens = fields.get("tokenizer.ggml.tokens")
    hf_json = fields.get(HF_JSON)
    if hf_json is None and not tokens:
        return None
    from tokenizers import Tokenizer as HFTokenizer
    try:
        backend = HFTokenizer.from_str(hf_json) if hf_json is not None else _gemma_bpe(fields)
    except Exception as e:  # tokenizers raises bare Exceptions on malformed input
        raise ConfigError(f"{source}: cannot build the tokenizer from its metadata ({e})") from None
    if backend is None:
        return None
    types = list(fields.get("tokenizer.ggml.token_type") or [])
    special = [i for i, t in enumerate(types) if t == CONTROL]
    names = list(tokens or [])

    def text_of(key: str, default: str) -> str:
        i = fields.get(f"tokenizer.ggml.{key}")
        return names[i] if isinstance(i, int) and 0 <= i < len(names) else default
    return Tokenizer(backend, "tokenizers", fields.get("tokenizer.chat_template"), special,
                     text_of("bos_token_id", "<bos>"), text_of("eos_token_id", "<eos>"))


def _gemma_bpe(fields: Mapping[str, Any]) -> Any:
    """Byte-fallback BPE with Gemma's "▁" space handling, from tokens + merges; None if no merges."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    if not merges:
        return None
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    bpe = models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                     unk_token=tokens[unk] if isinstance(unk, int) and unk < len(tokens) else None)
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == USER_DEFINED])
    return tok
