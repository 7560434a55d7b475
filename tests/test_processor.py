"""Prompts with images against transformers 5.23.0's Gemma4Processor: input_ids with the
placeholders expanded, mm_token_type_ids, pixel_values and image_position_ids, from text with
placeholders and from chat messages; and the errors for prompts and checkpoints that do not fit."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from portable_dg.errors import ConfigError, PortableDGError
from portable_dg.image_processor import ImageError
from portable_dg.processor import Processor
from reference import load_hf_processor
from test_image_processor import encoded, synthetic
from tiny import GEMMA4_SPECIAL_TOKENS, TINY_IMAGE_GEOMETRIES, write_tiny_processor

pytest.importorskip("transformers")


def write_checkpoint(path, geometry: str, vision: bool = True, image_token_id: int | None = None):
    """The processor files of a tiny multimodal checkpoint, with a config.json holding only what the
    processor reads (the vision tower's weights are not needed here)."""
    write_tiny_processor(path, geometry)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    config = {"model_type": "diffusion_gemma",
              "image_token_id": image_token_id or vocab[GEMMA4_SPECIAL_TOKENS["image_token"]],
              "boi_token_id": vocab[GEMMA4_SPECIAL_TOKENS["boi_token"]],
              "eoi_token_id": vocab[GEMMA4_SPECIAL_TOKENS["eoi_token"]]}
    if vision:
        config["vision_config"] = {"model_type": "gemma4_vision", **TINY_IMAGE_GEOMETRIES[geometry]["vision"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Factory: checkpoint(geometry) -> (directory, our Processor, transformers' processor), cached."""
    made = {}

    def make(geometry: str = "p4k2"):
        if geometry not in made:
            path = write_checkpoint(tmp_path_factory.mktemp(f"processor_{geometry}"), geometry)
            made[geometry] = path, Processor.from_directory(path), load_hf_processor(path)
        return made[geometry]

    return make


def assert_same_inputs(ours, theirs):
    """Our 1-D text arrays are transformers' [1, T] ones without the batch axis."""
    np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"][0])
    np.testing.assert_array_equal(ours.mm_token_type_ids, theirs["mm_token_type_ids"][0])
    assert ours.input_ids.dtype == ours.mm_token_type_ids.dtype == np.int64
    if ours.pixel_values is None:
        assert "pixel_values" not in theirs
        return
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
    np.testing.assert_array_equal(ours.image_position_ids, theirs["image_position_ids"])


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(encoded(image)).decode()


@pytest.mark.parametrize("geometry", sorted(TINY_IMAGE_GEOMETRIES))
def test_text_with_two_images_matches_transformers(checkpoint, geometry):
    _, ours, theirs = checkpoint(geometry)
    images = [synthetic(37, 61, seed=1), synthetic(120, 40, seed=2)]
    text = "Compare <|image|> with<|image|>: which one is larger?"
    prompt = ours(text, images)
    assert_same_inputs(prompt, theirs(text=text, images=images, return_tensors="np"))
    # each placeholder became <|image>, n x <|image|>, <image|>, with n the image's soft tokens
    ids, tokens = prompt.input_ids, ours.tokens
    starts = np.flatnonzero(ids == ours.tokenizer.token_to_id(tokens.begin))
    for start, n in zip(starts, prompt.num_soft_tokens):
        assert (ids[start + 1:start + 1 + n] == tokens.image_id).all()
        assert ids[start + 1 + n] == ours.tokenizer.token_to_id(tokens.end)
    assert prompt.mm_token_type_ids.sum() == sum(prompt.num_soft_tokens)
    assert prompt.pixel_values.shape == (2, ours.image_config.max_patches, 3 * ours.image_config.patch_size ** 2)


def test_soft_token_budget_option_matches_transformers(checkpoint):
    _, ours, theirs = checkpoint("p4k2")
    images = [synthetic(200, 300, seed=3)]
    prompt = ours("<|image|>Describe this image.", images, max_soft_tokens=140)
    assert_same_inputs(prompt, theirs(text="<|image|>Describe this image.", images=images, max_soft_tokens=140,
                                      return_tensors="np"))
    assert prompt.pixel_values.shape[1] == 140 * 4 and prompt.num_soft_tokens[0] > 70
    with pytest.raises(ConfigError, match="max_soft_tokens option: max_soft_tokens must be one of"):
        ours("<|image|>", images, max_soft_tokens=100)


def test_text_only_prompt(checkpoint):
    _, ours, theirs = checkpoint("p4k2")
    prompt = ours("hello world, the model denoises")
    assert prompt.pixel_values is None and prompt.image_position_ids is None and not prompt.mm_token_type_ids.any()
    assert_same_inputs(prompt, theirs(text="hello world, the model denoises", return_tensors="np"))


@pytest.mark.parametrize("geometry", sorted(TINY_IMAGE_GEOMETRIES))
def test_chat_messages_match_transformers(checkpoint, tmp_path, geometry):
    """OpenAI image_url parts (data: URLs), and transformers-style image parts given a path, bytes or
    a PIL image, render through the checkpoint's template like transformers' apply_chat_template."""
    _, ours, theirs = checkpoint(geometry)
    first, second, third = synthetic(50, 70, seed=4), synthetic(64, 20, seed=5, mode="RGBA"), synthetic(30, 30, seed=6)
    (tmp_path / "third.png").write_bytes(encoded(third))
    messages = [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [{"type": "text", "text": "What is in "},
                                     {"type": "image_url", "image_url": {"url": data_url(first)}},
                                     {"type": "text", "text": "and here?"},
                                     {"type": "image", "image": second}]},
        {"role": "assistant", "content": "A red square, a blue circle."},
        {"role": "user", "content": [{"type": "image", "path": str(tmp_path / "third.png")},
                                     {"type": "text", "text": "And this one?"}]},
    ]
    hf_messages = json.loads(json.dumps(messages, default=str))
    hf_messages[1]["content"][1] = {"type": "image", "url": data_url(first)}
    hf_messages[1]["content"][3] = {"type": "image", "image": second}
    for thinking in (False, True):
        prompt = ours.apply_chat_template(messages, enable_thinking=thinking)
        expected = theirs.apply_chat_template(hf_messages, tokenize=True, return_dict=True, return_tensors="np",
                                              add_generation_prompt=True, enable_thinking=thinking)
        assert_same_inputs(prompt, expected)
        assert prompt.input_ids[0] == ours.tokenizer.token_to_id("<bos>")
        assert (prompt.input_ids == ours.tokenizer.token_to_id("<bos>")).sum() == 1   # BOS from the template only
    # an encoded image given as bytes or as a path string in an image part: the same inputs
    by_bytes, by_path = (ours.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": source}, {"type": "text", "text": "x"}]}])
        for source in (encoded(third), str(tmp_path / "third.png")))
    for key in ("input_ids", "mm_token_type_ids", "pixel_values", "image_position_ids"):
        np.testing.assert_array_equal(getattr(by_bytes, key), getattr(by_path, key))


@pytest.mark.parametrize("text, n_images", [
    ("one <|image|> placeholder", 2), ("<|image|> and <|image|>", 1), ("no placeholder", 1),
    ("<|image|> without an image", 0)])
def test_placeholders_must_match_images(checkpoint, text, n_images):
    _, ours, _ = checkpoint("p4k2")
    expected = f"the prompt has {text.count('<|image|>')} <|image|> placeholder(s) but {n_images} image(s) were given"
    with pytest.raises(ImageError, match=re.escape(expected)):
        ours(text, [synthetic(20, 20)] * n_images)


def test_bad_chat_content(checkpoint):
    _, ours, _ = checkpoint("p4k2")
    image = {"type": "image_url", "image_url": {"url": data_url(synthetic(20, 20))}}
    with pytest.raises(ImageError, match="rendered 0 image placeholder.s. for 1 image part.s."):
        ours.apply_chat_template([{"role": "system", "content": [image]}, {"role": "user", "content": "hi"}])
    with pytest.raises(PortableDGError, match="message 0 part 1: content part type 'input_audio' is not supported"):
        ours.apply_chat_template([{"role": "user", "content": [image, {"type": "input_audio"}]}])
    with pytest.raises(ImageError, match="message 0 part 0: image part without an image"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ImageError, match=r"image 1 \(https://example.com/cat.png\): network image URLs"):
        ours.apply_chat_template([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    with pytest.raises(ImageError, match="image 2: corrupt or truncated PNG data"):
        ours.apply_chat_template([{"role": "user", "content": [
            image, {"type": "image", "image": encoded(synthetic(20, 20))[:30]}]}])
    with pytest.raises(PortableDGError, match=re.escape("the prompt contains <|audio|>: this model reads text")):
        ours("listen: <|audio|>")


def test_checkpoints_that_cannot_take_images(tmp_path):
    no_vision = write_checkpoint(tmp_path / "no_vision", "p4k2", vision=False)
    (tmp_path / "no_processor").mkdir()
    no_processor = write_checkpoint(tmp_path / "no_processor", "p4k2")
    (no_processor / "processor_config.json").unlink()
    image = synthetic(20, 20)
    for path, expected in ((no_vision, "config.json has no vision_config: this checkpoint has no vision tower"),
                           (no_processor, "no image processor config")):
        processor = Processor.from_directory(path)
        assert processor("hello world").pixel_values is None          # text prompts still work
        with pytest.raises(ConfigError, match=expected) as error:
            processor("<|image|>", [image])
        assert str(error.value).startswith(str(path))
    (tmp_path / "wrong_id").mkdir()
    with pytest.raises(ConfigError, match=re.escape("image_token_id 3 but the tokenizer gives <|image|> the id")):
        Processor.from_directory(write_checkpoint(tmp_path / "wrong_id", "p4k2", image_token_id=3))


def test_tokenizer_without_image_tokens(tmp_path):
    from test_tokenizer import write_tokenizer

    write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {}}))
    (tmp_path / "preprocessor_config.json").write_text("{}")
    processor = Processor.from_directory(tmp_path)
    assert processor("hello world").input_ids.tolist() == processor.tokenizer.encode("hello world")
    with pytest.raises(ConfigError, match=re.escape("the tokenizer has no <|image|>, <|image>, <image|> token")):
        processor("<|image|>", [synthetic(8, 8)])


def test_placeholder_that_is_not_one_token(tmp_path):
    """A tokenizer that knows <|image|> but splits it in text would misplace the image features."""
    write_checkpoint(tmp_path, "p4k2")
    tokenizer = json.loads((tmp_path / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|image|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match=re.escape("it must keep <|image|> as one special token")):
        Processor.from_directory(tmp_path)("<|image|>", [synthetic(20, 20)])
