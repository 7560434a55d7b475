"""`pdg generate --image`: the checkpoint's processor and chat template, and one-line errors for bad
images, placeholder counts and models without a vision tower."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import portable_dg
from portable_dg.cli import main
from portable_dg.processor import Processor
from test_image_processor import encoded, png_header, synthetic
from tiny import build_tiny_multimodal


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_cli") / "model"
    build_tiny_multimodal(path, "a", "p4k2")
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two image files of different formats, sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "wide.png").write_bytes(encoded(synthetic(40, 70, seed=1)))
    (folder / "tall.jpg").write_bytes(encoded(synthetic(90, 30, seed=2), "JPEG"))
    return [folder / "wide.png", folder / "tall.jpg"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_with_images_matches_the_api(checkpoint, images):
    """Images before the text of the user turn, through the chat template, as the API takes them."""
    result = run("generate", "--model", checkpoint, "--prompt", "Compare the two images.", "--image", images[0],
                 "--image", images[1], "--ids", "--greedy", "--seed", "0", "--max-new-tokens", "16")
    assert result.exit_code == 0, result.output
    model = portable_dg.load(checkpoint)
    content = [*({"type": "image", "image": str(p)} for p in images),
               {"type": "text", "text": "Compare the two images."}]
    inputs = Processor.from_directory(checkpoint).apply_chat_template([{"role": "user", "content": content}])
    out = portable_dg.generate(model, inputs.input_ids, pixel_values=inputs.pixel_values,
                               image_position_ids=inputs.image_position_ids,
                               mm_token_type_ids=inputs.mm_token_type_ids, greedy=True, seed=0, max_new_tokens=16)
    assert result.stdout.strip() == ",".join(map(str, out.ids))
    assert "[16 tokens" in result.stderr


def test_without_chat_template_placeholders_go_first_unless_given(checkpoint, images):
    common = ["generate", "--model", checkpoint, "--no-chat", "--ids", "--greedy", "--seed", "0",
              "--max-new-tokens", "16"]
    implicit = run(*common, "--prompt", "Describe this image.", "--image", images[0])
    explicit = run(*common, "--prompt", "<|image|>Describe this image.", "--image", images[0])
    elsewhere = run(*common, "--prompt", "Describe <|image|> this image.", "--image", images[0])
    assert implicit.exit_code == explicit.exit_code == elsewhere.exit_code == 0, implicit.output
    assert implicit.stdout == explicit.stdout != elsewhere.stdout


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    png, jpeg = encoded(synthetic(40, 40)), encoded(synthetic(64, 64), "JPEG")
    files = {"truncated.png": png[: len(png) // 2], "truncated.jpg": jpeg[: len(jpeg) // 2],
             "corrupt.png": png[:8] + b"garbage" * 5, "drawing.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
             "empty.png": png_header(0, 12)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("name, message", [
    ("truncated.png", "truncated or corrupt PNG"),
    ("truncated.jpg", "truncated or corrupt JPEG"),
    ("corrupt.png", "corrupt or truncated PNG data"),
    ("drawing.svg", "not an image in a format Pillow reads"),
    ("empty.png", "zero-sized image (0x12"),
    ("missing.png", "no such image file"),
])
def test_bad_image_files_are_one_line_errors(checkpoint, bad_files, name, message):
    result = run("generate", "--model", checkpoint, "--prompt", "What is this?", "--image", bad_files / name)
    assert result.exit_code == 1
    assert message in result.stderr and str(bad_files / name) in result.stderr
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def without_vision(checkpoint, tmp_path_factory):
    """The checkpoint with vision_config removed from config.json: no vision tower."""
    path = tmp_path_factory.mktemp("text_only") / "model"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    del config["vision_config"]
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("args, message", [
    (["--no-chat", "--prompt", "<|image|> and <|image|>", "--image", "IMG0"], "2 <|image|> placeholder(s) but 1 image"),
    (["--no-chat", "--prompt", "<|image|> only", "--image", "IMG0", "--image", "IMG1"],
     "1 <|image|> placeholder(s) but 2 image"),
    (["--prompt-ids", "2,3", "--image", "IMG0"], "--image needs a text --prompt"),
    (["--model", "TEXT_ONLY", "--prompt", "hi", "--image", "IMG0"], "has no vision tower"),
])
def test_image_errors_are_one_line(checkpoint, images, without_vision, args, message):
    substitutes = {"IMG0": images[0], "IMG1": images[1], "TEXT_ONLY": without_vision}
    args = [substitutes.get(a, a) for a in args]
    model = [] if "--model" in args else ["--model", checkpoint]
    result = run("generate", *model, *args)
    assert result.exit_code == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1


def test_gguf_model_with_mmproj_takes_images(checkpoint, images, tmp_path):
    """`pdg convert --to gguf` and `--to mmproj` (F32), then `pdg generate --mmproj`: the processor
    rebuilt from the two files gives the ids the checkpoint directory gives."""
    gguf, mmproj = tmp_path / "model-F32.gguf", tmp_path / "mmproj-F32.gguf"
    for target, out in (("gguf", gguf), ("mmproj", mmproj)):
        result = run("convert", checkpoint, out, "--to", target, "--quant", "F32")
        assert result.exit_code == 0, result.output
    common = ["--prompt", "Compare the two images.", "--image", images[0], "--image", images[1], "--ids",
              "--greedy", "--seed", "0", "--max-new-tokens", "16", "--backend", "ggml"]
    from_files = run("generate", "--model", gguf, "--mmproj", mmproj, *common)
    from_directory = run("generate", "--model", checkpoint, *common)
    assert from_files.exit_code == 0, from_files.output
    assert from_files.stdout == from_directory.stdout
    without = run("generate", "--model", gguf, *common)
    assert without.exit_code == 1 and "--mmproj" in without.stderr
