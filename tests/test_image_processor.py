"""Image decoding and preprocessing against transformers 5.23.0's Gemma 4 image processor (PIL
backend: the one transformers runs without torchvision), and the bad-image errors."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from portable_dg.errors import ConfigError
from portable_dg.image_processor import (ImageError, ImageProcessorConfig, load_image, preprocess,
                                         resized_size)
from tiny import TINY_IMAGE_GEOMETRIES


# (height, width): upsampled, downsampled, tall, exactly fitting, and so thin that one side rounds to 0
SIZES = [(37, 61), (300, 180), (90, 20), (48, 80), (3, 700)]


def synthetic(height: int, width: int, seed: int = 0, mode: str = "RGB"):
    """Gradients plus noise: smooth areas and edges, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-40, 41, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image = image.convert("RGBA")
        image.putalpha(alpha)
    return image.convert(mode) if mode not in ("RGB", "RGBA") else image


def encoded(image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def hf_image_processor(**settings):
    from transformers.models.gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**settings)


def assert_same_batch(ours, theirs):
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.image_position_ids, theirs["image_position_ids"])
    assert ours.image_position_ids.dtype == np.int64
    assert ours.num_soft_tokens == list(theirs["num_soft_tokens_per_image"])


@pytest.mark.parametrize("geometry", sorted(TINY_IMAGE_GEOMETRIES))
def test_pixels_match_transformers_bit_for_bit(geometry):
    settings = TINY_IMAGE_GEOMETRIES[geometry]["image"]
    images = [synthetic(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = preprocess(images, ImageProcessorConfig(**settings))
    assert_same_batch(ours, hf_image_processor(**settings)(images, return_tensors="np"))
    k, p = settings["pooling_kernel_size"], settings["patch_size"]
    for i, (h, w) in enumerate(SIZES):                 # padding rows are zero pixels at (-1, -1)
        n = ours.num_soft_tokens[i] * k * k
        assert (ours.image_position_ids[i, n:] == -1).all() and not ours.pixel_values[i, n:].any()
        assert ours.image_position_ids[i, :n].min() == 0
        rh, rw = resized_size(h, w, ImageProcessorConfig(**settings))
        assert ours.image_position_ids[i, n - 1].tolist() == [rw // p - 1, rh // p - 1]


@pytest.mark.parametrize("settings", [
    # the released geometry, with normalization on (mean/std per channel) and bilinear resampling
    dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=70, do_normalize=True,
         image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2),
    dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280, rescale_factor=1 / 127.5),
])
def test_released_geometry_and_options_match_transformers(settings):
    images = [synthetic(240, 320, seed=3), synthetic(500, 90, seed=4)]
    ours = preprocess(images, ImageProcessorConfig.from_dict(settings))
    assert_same_batch(ours, hf_image_processor(**settings)(images, return_tensors="np"))


def test_without_resize_or_rgb_conversion():
    """do_resize=false takes images whose sides are multiples of k * patch_size within the budget, as
    transformers does; others, and non-RGB images under do_convert_rgb=false, are refused."""
    settings = dict(TINY_IMAGE_GEOMETRIES["p4k2"]["image"], do_resize=False, do_convert_rgb=False)
    images = [synthetic(48, 64, seed=1), synthetic(8, 24, seed=2)]
    config = ImageProcessorConfig(**settings)
    assert_same_batch(preprocess(images, config), hf_image_processor(**settings)(images, return_tensors="np"))
    for image, expected in ((synthetic(50, 64), "64x50 pixels are not a whole number of 4x4 patches"),
                            (synthetic(4, 64), "image 1: 64x4 pixels do not fit do_resize=false"),
                            (synthetic(96, 96), "image 1: 96x96 pixels do not fit"),
                            (synthetic(8, 8, mode="L"), "image 1: mode L with do_convert_rgb=false")):
        with pytest.raises(ImageError, match=expected):
            preprocess([image], config)


def test_resized_size_matches_transformers():
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 999), (768, 768), (4032, 3024)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for budget in (70, 280, 1120):
        config = ImageProcessorConfig(max_soft_tokens=budget)
        for h, w in sizes:
            assert resized_size(h, w, config) == get_aspect_ratio_preserving_size(
                h, w, 16, config.max_patches, 3), (h, w, budget)


def test_transparency_and_modes_match_transformers():
    """A PIL image is used as given (alpha composited onto white); an encoded one is decoded as
    transformers' load_image does (EXIF rotation, RGB: alpha dropped)."""
    from transformers.image_utils import load_image as hf_load_image

    settings = TINY_IMAGE_GEOMETRIES["p4k2"]["image"]
    rgba = synthetic(40, 30, seed=5, mode="RGBA")
    palette = synthetic(33, 47, seed=6).convert("P")
    palette.info["transparency"] = 3
    rotated = encoded(synthetic(30, 50, seed=7), "JPEG", exif=_orientation(6))
    given = [rgba, palette, synthetic(25, 25, seed=8, mode="L"), synthetic(25, 25, seed=9, mode="CMYK")]
    files = [encoded(rgba), encoded(palette, transparency=3), rotated]
    ours = [load_image(image) for image in given + files]
    theirs = given + [hf_load_image(base64.b64encode(data).decode()) for data in files]
    assert ours[-1].size == (30, 50)                      # EXIF orientation 6: rotated upright
    config = ImageProcessorConfig(**settings)
    assert_same_batch(preprocess(ours, config), hf_image_processor(**settings)(theirs, return_tensors="np"))


def _orientation(value: int):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_sources_decode_alike(tmp_path):
    data = encoded(synthetic(20, 30))
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    arrays = [np.asarray(load_image(source)) for source in
              (str(tmp_path / "a.png"), tmp_path / "a.png", data, bytearray(data), memoryview(data), url)]
    for array in arrays[1:]:
        np.testing.assert_array_equal(array, arrays[0])


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels with (almost) no pixel data: what a decompression bomb's
    header looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def test_bad_images_are_one_line_errors(tmp_path):
    png = encoded(synthetic(40, 40))
    jpeg = encoded(synthetic(64, 64), "JPEG")
    cases = {
        "truncated or corrupt PNG": png[: len(png) // 2],
        "truncated or corrupt JPEG": jpeg[: len(jpeg) // 2],
        "corrupt or truncated PNG data": png[:8] + b"garbage" * 5,
        "not an image in a format Pillow reads": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        "empty file": b"",
        r"zero-sized image \(0x12": png_header(0, 12),
        "exceeds the limit": png_header(9000, 9000),
        "too large to decode safely": png_header(20000, 20000),
    }
    for expected, data in cases.items():
        (tmp_path / "bad").write_bytes(data)
        for source, name in ((data, "image"), (tmp_path / "bad", str(tmp_path / "bad"))):
            with pytest.raises(ImageError, match=expected) as error:
                load_image(source)
            message = str(error.value)
            assert message.startswith(name + ":") and "\n" not in message, message


@pytest.mark.parametrize("source, expected", [
    ("/no/such/file.png", "no such image file"),
    ("https://example.com/cat.png", "network image URLs are not fetched"),
    ("data:image/png,notbase64", "expected data:image/<type>;base64"),
    ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain' is not an image"),
    ("data:image/png;base64,@@@", "invalid base64"),
    (42, "expected a path, bytes, a data: URL or a PIL image, got int"),
])
def test_bad_sources(source, expected):
    with pytest.raises(ImageError, match=expected):
        load_image(source)


def test_pil_image_limits():
    with pytest.raises(ImageError, match=r"image: zero-sized image \(0x5 pixels\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="30x20 = 600 pixels exceeds the limit of 599"):
        load_image(synthetic(20, 30), max_pixels=599)


def test_config_from_files(tmp_path):
    assert ImageProcessorConfig.from_directory(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 8, "max_soft_tokens": 140}))
    assert ImageProcessorConfig.from_directory(tmp_path).patch_size == 8
    nested = {"image_processor": {"patch_size": 4, "image_mean": 0.5, "resample": 2}, "image_seq_length": 280}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    config = ImageProcessorConfig.from_directory(tmp_path)        # the nested section wins
    assert (config.patch_size, config.image_mean, config.resample, config.max_patches) == (4, (0.5,) * 3, 2, 2520)


@pytest.mark.parametrize("section, expected", [
    ({"max_soft_tokens": 100}, "max_soft_tokens must be one of"),
    ({"patch_size": 0}, "patch_size must be a positive integer"),
    ({"image_processor_type": "SiglipImageProcessor"}, "'SiglipImageProcessor' is not supported"),
    ({"image_std": [1.0, 0.0, 1.0]}, "image_std must not contain 0"),
    ({"resample": 9}, "resample must be a PIL filter number"),
])
def test_bad_config_names_the_file(tmp_path, section, expected):
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": section}))
    with pytest.raises(ConfigError, match=expected) as error:
        ImageProcessorConfig.from_directory(tmp_path)
    assert str(error.value).startswith(str(tmp_path / "processor_config.json"))
