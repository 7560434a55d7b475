"""Tokenizer loading and the chat template with the thinking toggle."""

from __future__ import annotations

import json

import pytest

from portable_dg.errors import ConfigError, PortableDGError
from portable_dg.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>",
            "<|channel>", "<channel|>"]

# The shape of the Gemma 4 template: optional system turn, <|think|> at its start when thinking is
# on, an empty thought block in the generation prompt when it is off.
GEMMA4_LIKE_TEMPLATE = (
    "{{ bos_token }}"
    "{% if enable_thinking %}<|turn>system\n<|think|><turn|>\n{% endif %}"
    "{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if not enable_thinking %}<|channel>thought\n<channel|>{% endif %}{% endif %}"
)


def write_tokenizer(path, template: str | None = GEMMA4_LIKE_TEMPLATE, in_config: bool = False):
    """A small word-level tokenizer.json with Gemma-style special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, decoders

    words = ["hello", "world", "model", "user", "system", "thought", "\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(r"\s+|\n", behavior="isolated")
    tok.decoder = decoders.Sequence([])
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}}
    if template is not None and in_config:
        config["chat_template"] = template
    elif template is not None:
        (path / "chat_template.jinja").write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_encode_decode_and_specials(tmp_path):
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_directory(tmp_path)
    ids = tok.encode("<|turn>hello")
    assert ids[0] == SPECIALS.index("<|turn>")
    assert tok.token_to_id("<eos>") == 1
    assert tok.decode([2, *ids, 1]) == "hello"            # specials skipped
    assert "<|turn>" in tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("in_config", [False, True])
def test_chat_template_thinking_toggle(tmp_path, in_config):
    write_tokenizer(tmp_path, in_config=in_config)
    tok = Tokenizer.from_directory(tmp_path)
    messages = [{"role": "user", "content": "hello"}]
    off = tok.apply_chat_template(messages)
    on = tok.apply_chat_template(messages, enable_thinking=True)
    assert off == "<bos><|turn>user\nhello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert on.startswith("<bos><|turn>system\n<|think|>") and on.endswith("<|turn>model\n")
    assert tok.encode(off)[0] == 2                          # one BOS, from the template


def test_no_tokenizer_files(tmp_path):
    assert Tokenizer.from_directory(tmp_path) is None


def test_missing_template_is_a_clear_error(tmp_path):
    write_tokenizer(tmp_path, template=None)
    with pytest.raises(ConfigError, match="no chat template"):
        Tokenizer.from_directory(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception_and_bad_json(tmp_path):
    write_tokenizer(tmp_path, template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(PortableDGError, match="roles must alternate"):
        Tokenizer.from_directory(tmp_path).apply_chat_template([])
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        Tokenizer.from_directory(tmp_path)


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["hello world", "the model denoises a canvas", "hello canvas"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=40, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
                                   unk_id=3)
    tok = Tokenizer.from_directory(tmp_path)
    assert tok.kind == "sentencepiece"
    ids = tok.encode("hello canvas")
    assert tok.decode([2, *ids, 1]) == "hello canvas"
