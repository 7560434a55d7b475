"""Tokenizer and chat template.

`tokenizer.json` is read with the `tokenizers` library; a directory with only `tokenizer.model` is
read with sentencepiece.  The chat template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) is rendered with jinja2 the way transformers renders it (sandboxed,
trim_blocks/lstrip_blocks), with `enable_thinking` as the thinking toggle (spec §5).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, PortableDGError


class Tokenizer:
    """Text <-> ids, special tokens, and the chat template of a checkpoint."""

    def __init__(self, backend: Any, kind: str, chat_template: str | None = None,
                 special_ids: Sequence[int] = (), bos_token: str | None = "<bos>",
                 eos_token: str | None = "<eos>"):
        self.backend = backend      # a tokenizers.Tokenizer or a sentencepiece.SentencePieceProcessor
        self.kind = kind            # "tokenizers" or "sentencepiece"
        self.chat_template = chat_template
        self.special_ids = set(special_ids)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_directory(cls, path: str | Path) -> "Tokenizer | None":
        """The tokenizer files of a checkpoint directory, or None if it has none."""
        path = Path(path)
        config = _read_optional_json(path / "tokenizer_config.json")
        template = None
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        if (path / "tokenizer.json").exists():
            try:
                from tokenizers import Tokenizer as HFTokenizer
                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ConfigError(f"{path / 'tokenizer.json'}: cannot load tokenizer ({e})") from None
            added = _read_optional_json(path / "tokenizer.json").get("added_tokens", [])
            special = [int(t["id"]) for t in added if isinstance(t, dict) and t.get("special")]
            return cls(backend, "tokenizers", template, special, bos or "<bos>", eos or "<eos>")
        if (path / "tokenizer.model").exists():
            try:
                import sentencepiece
            except ImportError:
                raise ConfigError(f"{path / 'tokenizer.model'}: needs the sentencepiece package") from None
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
            return cls(sp, "sentencepiece", template, special, bos or "<bos>", eos or "<eos>")
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows."""
        if self.kind == "tokenizers":
            return self.backend.get_vocab_size(with_added_tokens=True)
        return self.backend.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids.  Special-token strings in the text (`<|turn>`, ...) map to their ids."""
        if self.kind == "tokenizers":
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.backend.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text, special tokens dropped unless asked for."""
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None."""
        if self.kind == "tokenizers":
            return self.backend.token_to_id(token)
        i = self.backend.piece_to_id(token)
        return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            enable_thinking: bool = False) -> str:
        """Render the checkpoint's chat template (the text still holds `<bos>`; encode it with
        add_special_tokens=False)."""
        if not self.chat_template:
            raise ConfigError("this checkpoint has no chat template; use --no-chat or give a template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise PortableDGError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   enable_thinking=enable_thinking, bos_token=self.bos_token,
                                   eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template: {e}") from None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None
