"""Prompts in, text out: message flattening and the streamed text of committed canvases."""

from __future__ import annotations

import pytest

from portable_dg.errors import ConfigError
from portable_dg.server.prompts import TextStream, TokenPieces, chat_prompt_ids, message_text, text_prompt_ids

EOS = 1


@pytest.fixture(scope="module")
def tok(text_model):
    return text_model.tokenizer


def canvases(ids, length=4):
    return [ids[i:i + length] for i in range(0, len(ids), length)]


def test_text_streams_canvas_by_canvas(tok):
    ids = tok.encode("hello world, again")
    stream = TextStream(tok, [EOS], max_tokens=100)
    deltas = [stream.push(c) for c in canvases(ids)]
    assert deltas == ["hell", "o wo", "rld,", " aga", "in"] and stream.finish() == ""
    assert stream.finish_reason == "length" and stream.tokens == len(ids)


def test_text_ends_at_eos_and_at_max_tokens(tok):
    ids = tok.encode("abcdef")
    stream = TextStream(tok, [EOS], max_tokens=100)
    assert stream.push(ids[:3] + [EOS, 0, 0]) == "abc" and stream.finish_reason == "stop"
    assert stream.push(ids[3:]) == ""                       # nothing after the end
    short = TextStream(tok, [EOS], max_tokens=4)
    assert short.push(ids) == "abcd" and short.finish_reason == "length" and short.tokens == 4


def test_an_unfinished_utf8_sequence_is_held_back(tok):
    ids = tok.encode("né!")                                 # é is two byte tokens
    stream = TextStream(tok, [EOS], max_tokens=100)
    assert stream.push(ids[:2]) == "n"
    assert stream.push(ids[2:]) == "é!"


def test_stop_strings_across_canvases(tok):
    ids = tok.encode("one two STOP three")
    stream = TextStream(tok, [EOS], max_tokens=100, stop=["STOP", "zzz"])
    out = [stream.push(c) for c in canvases(ids, 5)]           # "one t" "wo ST" "OP th" "ree"
    assert out[:3] == ["one t", "wo ", ""]                     # "ST" may start "STOP": held back
    assert "".join(out) == "one two " and stream.finish_reason == "stop"
    assert stream.tokens == len(tok.encode("one two "))
    held = TextStream(tok, [EOS], max_tokens=100, stop=["two!"])
    assert held.push(tok.encode("one tw")) == "one " and held.finish() == "tw"


def test_message_text_and_prompts(tok):
    assert message_text(None) == "" and message_text("hi") == "hi"
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    with pytest.raises(ConfigError, match="only text"):
        message_text([{"type": "image_url", "image_url": {}}])
    ids = chat_prompt_ids(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"
    assert text_prompt_ids(tok, 2, "hi") == [2] + tok.encode("hi")
    assert text_prompt_ids(tok, 2, "<bos>hi") == [2] + tok.encode("hi")


def test_token_pieces(tok):
    pieces = TokenPieces(tok)
    assert pieces([EOS] + tok.encode("ab")) == ["<eos>", "a", "b"]
