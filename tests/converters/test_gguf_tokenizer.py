"""GGUF tokenizer arrays as llama.cpp's converter writes them (Gemma4Model.set_vocab over gguf-py's
LlamaHfVocab), for a tokenizer with byte tokens, named and unnamed special tokens, the Gemma 4 chat
and tool tokens, and added tokens beyond the model's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portable_dg.converters.gguf_tokenizer import (BYTE, CONTROL, NORMAL, USER_DEFINED, tokenizer_metadata,
                                                   tokenizer_from_metadata)
from portable_dg.tokenizer import Tokenizer

BASE = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>",         # 0-4: named special (tokenizer_config.json)
        "<0x0A>", "<0x41>", "<0xFF>",                        # 5-7: byte tokens
        "<|turn>", "<turn|>",                                # 8-9: special in tokenizer.json, not named
        "<|channel>", "<channel|>", '<|"|>',                 # 10-12: Gemma 4 chat tokens, special
        "<img>", "<xtra>",                                   # 13-14: image_token; extra_special_tokens
        "a", "b", "ab", "▁a", "▁ab", "x y", "z", "x yz", "<0x0G>"]   # 15-23: words ("<0x0G>" is no byte)
ADDED_BEYOND = [("<|tool_call>", True), ("<tool_call|>", False), ("<user>", False), ("<beyond>", True),
                ("<eot>", True)]                             # 24-28
# What llama.cpp's rules give, token by token (spec/file_formats.md §1.5, issue 13):
EXPECTED_TYPES = ([CONTROL] * 5 + [BYTE] * 3 + [NORMAL] * 2 + [USER_DEFINED] * 3 + [CONTROL] * 2
                  + [NORMAL] * 9
                  + [USER_DEFINED, USER_DEFINED, USER_DEFINED, USER_DEFINED, CONTROL])


def write_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {tok: i for i, tok in enumerate(BASE)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("▁a", "b"), ("x y", "z")],
                                 byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE[:5] + BASE[8:15]])
    for text, special in ADDED_BEYOND:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(text, special=special, normalized=False)])
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "mask_token": "<mask>", "image_token": "<img>", "extra_special_tokens": ["<xtra>"],
        "eot_token": {"__type": "AddedToken", "content": "<eot>"}, "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}<|turn>{{ m['content'] }}<turn|>{% endfor %}"}))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return path


def test_arrays_follow_llama_cpp_rules(tokenizer_dir):
    meta = tokenizer_metadata(tokenizer_dir, Tokenizer.from_directory(tokenizer_dir))
    tokens = BASE + [t for t, _ in ADDED_BEYOND]
    assert meta["tokenizer.ggml.tokens"] == ("ARRAY:STRING", tokens)
    assert meta["tokenizer.ggml.token_type"] == ("ARRAY:INT32", EXPECTED_TYPES)
    assert meta["tokenizer.ggml.scores"] == ("ARRAY:FLOAT32", [-1000.0] * len(tokens))
    # merges as "left right"; a space inside a part is written as U+0120 (gguf-py SpecialVocab)
    assert meta["tokenizer.ggml.merges"] == ("ARRAY:STRING", ["a b", "▁a b", "x\u0120y z"])
    assert meta["tokenizer.ggml.model"] == ("STRING", "gemma4") and "tokenizer.ggml.pre" not in meta
    assert meta["tokenizer.ggml.bos_token_id"] == ("UINT32", 2)


def test_arrays_match_gguf_py_llama_hf_vocab(tokenizer_dir):
    """The same arrays from gguf-py's own LlamaHfVocab (what Gemma4Model.set_vocab iterates), with
    the set_vocab override of the seven chat and tool tokens applied."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from portable_dg.converters.gguf_tokenizer import VISIBLE_TOKENS

    theirs = [(text.decode(), score, USER_DEFINED if text.decode() in VISIBLE_TOKENS else int(kind))
              for text, score, kind in gguf.LlamaHfVocab(tokenizer_dir).all_tokens()]
    meta = tokenizer_metadata(tokenizer_dir, Tokenizer.from_directory(tokenizer_dir))
    ours = list(zip(meta["tokenizer.ggml.tokens"][1], meta["tokenizer.ggml.scores"][1],
                    meta["tokenizer.ggml.token_type"][1]))
    assert ours == theirs


def test_rebuilt_tokenizer_renders_chat_tokens_and_hides_control_ones(tokenizer_dir):
    """Without tokenizer.huggingface.json (the Unsloth files) the tokenizer is rebuilt from the
    arrays: control tokens and Gemma's <|...>/<...|> tokens are special, the chat and tool tokens
    llama.cpp renders are kept by decode."""
    meta = {k: v for k, (_, v) in tokenizer_metadata(tokenizer_dir, Tokenizer.from_directory(tokenizer_dir)).items()
            if k != "tokenizer.huggingface.json"}
    tok = tokenizer_from_metadata(meta, "test")
    ids = tok.encode("<|turn>ab<|channel>a<turn|>")
    assert ids == [8, 17, 10, 15, 9]
    assert tok.decode(ids) == "ab<|channel>a"
