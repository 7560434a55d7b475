"""Prompts with images -> the model's input arrays, as transformers 5.23.0's Gemma4Processor makes them.

Each `<|image|>` placeholder of the prompt text stands for one image.  The processor preprocesses
the images (`image_processor.py`), replaces the i-th placeholder by `<|image>` + n_i x `<|image|>` +
`<image|>` (n_i = the image's soft tokens), tokenizes the expanded text and marks the `<|image|>`
positions in `mm_token_type_ids`, where the vision tower's soft tokens will replace the embeddings.
`apply_chat_template` takes chat messages whose content may mix text and image parts (OpenAI
`image_url` parts or transformers-style `image` parts) and renders them through the checkpoint's
chat template first, as `Gemma4Processor.apply_chat_template(..., tokenize=True)` does.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import read_json
from .errors import ConfigError, PortableDGError
from .image_processor import DEFAULT_MAX_PIXELS, ImageError, ImageProcessorConfig, load_image, preprocess
from .tokenizer import Tokenizer

# Gemma 4's token strings, used when tokenizer_config.json does not name them.
GEMMA4_IMAGE_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>"}
# Placeholders of modalities this model does not read; transformers refuses them without their data.
GEMMA4_OTHER_PLACEHOLDERS = ("<|audio|>", "<|video|>")


@dataclass
class ProcessedPrompt:
    """A prompt's model inputs: transformers' processor arrays without the batch axis of the text ones."""

    input_ids: np.ndarray                   # [T] int64, each image expanded to <|image>, n x <|image|>, <image|>
    mm_token_type_ids: np.ndarray           # [T] int64: 1 at <|image|> (soft-token) positions, else 0
    pixel_values: np.ndarray | None         # [N, max_patches, 3 * patch^2] float32, None without images
    image_position_ids: np.ndarray | None   # [N, max_patches, 2] int64 (x, y); (-1, -1) pads
    num_soft_tokens: list[int]              # per image


@dataclass(frozen=True)
class ImageTokens:
    """The image token strings of a tokenizer and the placeholder's id."""

    image: str          # the placeholder, one per image in the prompt text, one per soft token after expansion
    begin: str          # opens an expanded image
    end: str            # closes it
    image_id: int


class Processor:
    """Text + images -> `ProcessedPrompt` for one checkpoint."""

    def __init__(self, tokenizer: Tokenizer, image_config: ImageProcessorConfig | None = None,
                 tokens: ImageTokens | None = None, *, no_images_reason: str | None = None,
                 other_placeholders: Sequence[str] = GEMMA4_OTHER_PLACEHOLDERS,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.tokens = tokens
        if no_images_reason is None and (image_config is None or tokens is None):
            no_images_reason = "this processor has no image processor config or image tokens"
        self.no_images_reason = no_images_reason   # why images are refused; None if they are taken
        self.other_placeholders = tuple(other_placeholders)
        self.max_pixels = max_pixels

    @classmethod
    def from_directory(cls, path: str | Path, tokenizer: Tokenizer | None = None, **options: Any) -> "Processor":
        """The processor of a checkpoint directory: its tokenizer and chat template, and, when the
        checkpoint has a vision tower (`vision_config` in config.json) and an image processor config,
        its image settings.  Without those, text prompts work and images raise ConfigError."""
        path = Path(path)
        tokenizer = tokenizer or Tokenizer.from_directory(path)
        if tokenizer is None:
            raise ConfigError(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model)")
        model = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        image_config = ImageProcessorConfig.from_directory(path)
        tokens, reason = _image_tokens(path, tokenizer, model)
        if not isinstance(model.get("vision_config"), dict):
            reason = (f"{path / 'config.json'} has no vision_config: this checkpoint has no vision tower, "
                      "so it cannot take images")
        elif image_config is None:
            reason = (f"{path}: no image processor config (processor_config.json with an image_processor "
                      "section, or preprocessor_config.json), so this checkpoint cannot take images")
        return cls(tokenizer, image_config, tokens, no_images_reason=reason, **options)

    @classmethod
    def for_model(cls, model: Any, **options: Any) -> "Processor":
        """The processor of a loaded model: its checkpoint directory's (`from_directory`), or, for
        a single file given a vision tower by an mmproj file, the image processor settings that
        file keeps and the model's own tokenizer and image token."""
        path = Path(model.source.path)
        if path.is_dir():
            return cls.from_directory(path, model.tokenizer, **options)
        if model.tokenizer is None:
            raise ConfigError(f"{path}: no tokenizer in the model file")
        settings = model.source.metadata.get("image_processor")
        if not settings:
            raise ConfigError(f"{path}: no image processor settings (a checkpoint directory's processor_config.json "
                              "or an mmproj file written by pdg convert --to mmproj), so it cannot take images")
        where = str(model.source.metadata.get("mmproj", path))
        tokens, reason = _image_tokens(Path(where), model.tokenizer, {"image_token_id": model.config.image_token_id})
        return cls(model.tokenizer, ImageProcessorConfig.from_dict(settings, where), tokens,
                   no_images_reason=reason, **options)

    def __call__(self, text: str, images: Sequence[Any] = (), *, add_special_tokens: bool = True,
                 max_soft_tokens: int | None = None) -> ProcessedPrompt:
        """Model inputs for `text` holding one image placeholder per image, in order.

        Args:
            images: paths, bytes, `data:` URLs or PIL images (see `image_processor.load_image`).
            add_special_tokens: let the tokenizer add its BOS (transformers' processor default).
            max_soft_tokens: the per-image soft-token budget instead of the config's (70, 140, 280,
                560 or 1120; more tokens, more detail).
        """
        images = list(images)
        self._check_placeholders(text, len(images))
        batch = None
        if images:
            config = self._image_config(max_soft_tokens)
            batch = preprocess([load_image(image, self.max_pixels, f"image {i + 1}")
                                for i, image in enumerate(images)], config)
            text = self._expand(text, batch.num_soft_tokens)
        soft_tokens = batch.num_soft_tokens if batch else []
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens), dtype=np.int64)
        is_image = ids == self.tokens.image_id if self.tokens else np.zeros(len(ids), bool)
        if int(is_image.sum()) != sum(soft_tokens):
            raise ConfigError(f"the tokenizer turned {sum(soft_tokens)} {self.tokens.image} placeholders into "
                              f"{int(is_image.sum())} id-{self.tokens.image_id} tokens; it must keep "
                              f"{self.tokens.image} as one special token")
        return ProcessedPrompt(ids, is_image.astype(np.int64), batch and batch.pixel_values,
                               batch and batch.image_position_ids, soft_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            enable_thinking: bool = False, max_soft_tokens: int | None = None) -> ProcessedPrompt:
        """Model inputs for chat messages whose content is a string or a list of parts:
        `{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": ...}}` (OpenAI)
        or `{"type": "image", "image" | "url" | "path": ...}` (transformers), an image being a path,
        bytes, a `data:` URL or a PIL image.  The images go to the template as `{"type": "image"}`
        parts, which Gemma 4's template renders as placeholders."""
        template_messages, images = split_image_parts(messages)
        text = self.tokenizer.apply_chat_template(template_messages, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking)
        found = text.count(self.tokens.image) if self.tokens else 0
        if found != len(images):
            raise ImageError(f"the chat template rendered {found} image placeholder(s) for {len(images)} "
                             "image part(s); it drops or adds images (e.g. images in a system message)")
        bos = self.tokenizer.bos_token
        # transformers: a rendered prompt that starts with BOS is tokenized without adding another
        return self(text, images, add_special_tokens=not (bos and text.startswith(bos)),
                    max_soft_tokens=max_soft_tokens)

    def _check_placeholders(self, text: str, n_images: int) -> None:
        for other in self.other_placeholders:
            if other in text:
                raise PortableDGError(f"the prompt contains {other}: this model reads text and images only")
        if self.tokens is None:
            if n_images:
                raise ConfigError(self.no_images_reason)
            return
        found = text.count(self.tokens.image)
        if found != n_images:
            raise ImageError(f"the prompt has {found} {self.tokens.image} placeholder(s) but {n_images} "
                             "image(s) were given; put one placeholder where each image goes")

    def _image_config(self, max_soft_tokens: int | None) -> ImageProcessorConfig:
        if self.no_images_reason is not None:
            raise ConfigError(self.no_images_reason)
        if max_soft_tokens is None:
            return self.image_config
        try:
            return dataclasses.replace(self.image_config, max_soft_tokens=max_soft_tokens)
        except ConfigError as e:
            raise ConfigError(f"max_soft_tokens option: {e}") from None

    def _expand(self, text: str, soft_tokens: list[int]) -> str:
        """The i-th placeholder -> begin + n_i placeholders + end (transformers'
        `get_text_with_replacements`)."""
        counts = iter(soft_tokens)
        t = self.tokens
        return re.sub(re.escape(t.image), lambda _: t.begin + t.image * next(counts) + t.end, text)


def split_image_parts(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages for the chat template with each image part replaced by `{"type": "image"}`,
    the image sources in order of appearance)."""
    template_messages, images = [], []
    for m, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            template_messages.append(message)
            continue
        parts = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind in ("image", "image_url"):
                images.append(_image_source(part, f"message {m} part {p}"))
                parts.append({"type": "image"})
            else:
                raise PortableDGError(f"message {m} part {p}: content part type {kind!r} is not supported; "
                                      "expected text, image_url or image")
        template_messages.append({**message, "content": parts})
    return template_messages, images


def _image_source(part: dict[str, Any], where: str) -> Any:
    if part["type"] == "image_url":
        value = part.get("image_url")
        source = value.get("url") if isinstance(value, dict) else value
    else:
        source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
        if source is None and isinstance(part.get("base64"), str):
            source = "data:image/*;base64," + part["base64"]
    if source is None:
        raise ImageError(f"{where}: image part without an image (expected image_url.url, or image, url or path)")
    return source


def _image_tokens(path: Path, tokenizer: Tokenizer, model: dict[str, Any]) -> tuple[ImageTokens | None, str | None]:
    """The image token strings (tokenizer_config.json, else the ids in config.json, else Gemma 4's)
    checked against the tokenizer and config.json's `image_token_id`."""
    tok_config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    ids = {"image_token": "image_token_id", "boi_token": "boi_token_id", "eoi_token": "eoi_token_id"}
    strings = {}
    for key, default in GEMMA4_IMAGE_TOKENS.items():
        value = tok_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if not isinstance(value, str) and isinstance(model.get(ids[key]), int):
            value = tokenizer.decode([model[ids[key]]], skip_special_tokens=False)
        strings[key] = value if isinstance(value, str) else default
    missing = [s for s in strings.values() if tokenizer.token_to_id(s) is None]
    if missing:
        return None, f"{path}: the tokenizer has no {', '.join(missing)} token, so this checkpoint cannot take images"
    image_id = tokenizer.token_to_id(strings["image_token"])
    expected = model.get("image_token_id")
    if isinstance(expected, int) and expected != image_id:
        raise ConfigError(f"{path / 'config.json'}: image_token_id {expected} but the tokenizer gives "
                          f"{strings['image_token']} the id {image_id}")
    return ImageTokens(strings["image_token"], strings["boi_token"], strings["eoi_token"], image_id), None
