"""Images -> vision-tower inputs, as transformers 5.23.0's Gemma 4 image processor makes them.

`load_image` decodes a path, bytes, a `data:` URL or a PIL image with Pillow, refusing corrupt,
truncated, unsupported, zero-sized and oversized images with one-line errors.  `preprocess` then
follows `Gemma4ImageProcessorPil` (`transformers/models/gemma4/image_processing_pil_gemma4.py`)
step by step: convert to RGB, resize keeping the aspect ratio so that the image holds at most
`max_soft_tokens * k^2` patches with both sides multiples of `k * patch_size` (k the pooling kernel),
rescale (float64 multiply, then float32), optionally normalize, cut into patches, pad to
`max_soft_tokens * k^2` patches.  The arrays are bit-identical to transformers' PIL backend.
transformers picks its torchvision backend (`Gemma4ImageProcessor`) instead when torchvision is
installed; that one resizes with torch's antialiased bicubic and rescales in float32, so its pixels
differ slightly (docs/vision.md gives the measured differences).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from .config import read_json
from .errors import ConfigError, PortableDGError

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)   # Gemma4ImageProcessor refuses any other budget
DEFAULT_MAX_PIXELS = 8192 * 8192                     # decoded pixels allowed per image (decompression bombs)
# Leading bytes of formats Pillow reads without plugins: a file that starts like one of these but does
# not open is corrupt, anything else is an unsupported format.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
READABLE = "PNG, JPEG, GIF, WebP, BMP, TIFF"


class ImageError(PortableDGError):
    """An input image cannot be used: unreadable, corrupt, unsupported, empty or too large."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image section of a checkpoint's processor config (defaults: Gemma4ImageProcessor's)."""

    patch_size: int = 16
    max_soft_tokens: int = 280          # soft tokens per image at most (one per pooled k x k patch block)
    pooling_kernel_size: int = 3        # k
    do_convert_rgb: bool = True
    do_resize: bool = True
    resample: int = 3                   # a PIL resampling filter; 3 = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("patch_size", "pooling_kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ConfigError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, "
                              f"got {self.max_soft_tokens!r}")
        if self.resample not in range(6):
            raise ConfigError(f"resample must be a PIL filter number 0-5, got {self.resample!r}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{name} must have 3 values (R, G, B), got {getattr(self, name)!r}")
        if 0 in self.image_std:
            raise ConfigError(f"image_std must not contain 0, got {self.image_std!r}")

    @property
    def max_patches(self) -> int:
        """Patch rows of `pixel_values` per image (real patches, then padding)."""
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "processor_config.json") -> "ImageProcessorConfig":
        """From an image processor dict as transformers saves it; unknown keys are ignored."""
        kind = d.get("image_processor_type")
        if kind is not None and kind not in ("Gemma4ImageProcessor", "Gemma4ImageProcessorPil"):
            raise ConfigError(f"{source}: image_processor_type {kind!r} is not supported; "
                              "expected Gemma4ImageProcessor")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        try:
            return cls(**kwargs)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_directory(cls, path: str | Path) -> "ImageProcessorConfig | None":
        """The image processor config of a checkpoint directory, or None if it has none.

        Read as transformers reads it: the `image_processor` section of `processor_config.json`,
        else a flat `preprocessor_config.json`."""
        path = Path(path)
        nested, flat = path / "processor_config.json", path / "preprocessor_config.json"
        if nested.is_file():
            section = read_json(nested).get("image_processor")
            if isinstance(section, dict):
                return cls.from_dict(section, source=f"{nested} (image_processor)")
        if flat.is_file():
            return cls.from_dict(read_json(flat), source=str(flat))
        return None


@dataclass
class ImageBatch:
    """The vision tower's inputs for N images."""

    pixel_values: np.ndarray        # [N, max_patches, 3 * patch^2] float32; rows past an image's patches are 0
    image_position_ids: np.ndarray  # [N, max_patches, 2] int64 (x, y) patch coordinates; (-1, -1) pads
    num_soft_tokens: list[int]      # soft tokens (placeholders in the prompt) per image


def load_image(source: Any, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image"):
    """Decode one image with Pillow.

    Args:
        source: a path (str or Path), bytes, a `data:image/...;base64,` URL or a PIL image.
        max_pixels: the largest width x height accepted (guards against decompression bombs).
        name: how errors name an image that is not a file (a file is named by its path).
    Returns:
        A PIL image.  Encoded input is decoded as transformers' `load_image` does it (EXIF
        orientation applied, converted to RGB, so an alpha channel is dropped); a PIL image is
        returned as given (`preprocess` composites its alpha onto white, as transformers' processor
        does).  No network access: http(s) URLs are refused.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, name)
        _decode_fully(source, name)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_encoded(io.BytesIO(source), name, max_pixels)
    if isinstance(source, str) and source.startswith("data:"):
        return _open_encoded(io.BytesIO(decode_data_url(source, name)), name, max_pixels)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{name} ({source[:60]}): network image URLs are not fetched; download the image "
                         "and give its path, bytes or a data: URL")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        with open(path, "rb") as stream:
            return _open_encoded(stream, str(path), max_pixels)
    raise ImageError(f"{name}: expected a path, bytes, a data: URL or a PIL image, "
                     f"got {type(source).__name__}")


def decode_data_url(url: str, name: str = "data: URL") -> bytes:
    """The bytes of a base64 `data:image/<type>;base64,<data>` URL."""
    header, sep, payload = url.partition(",")
    media_type = header[len("data:"):].split(";")[0]
    if not sep or not header.endswith(";base64"):
        raise ImageError(f"{name}: expected data:image/<type>;base64,<data>")
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"{name}: media type {media_type!r} is not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: invalid base64 data ({e})") from None


def _open_encoded(stream: BinaryIO, name: str, max_pixels: int):
    from PIL import Image, ImageOps

    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):   # OSError: UnidentifiedImageError too
        stream.seek(0)
        raise ImageError(f"{name}: {_unreadable(stream.read(32))}") from None
    _check_size(image.size, max_pixels, name)
    _decode_fully(image, name, image.format)
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise ImageError(f"{name}: cannot convert the {image.format} image to RGB ({e})") from None


def _unreadable(head: bytes) -> str:
    """Why Pillow could not identify a file starting with `head`: a known format with a broken
    header, or another format."""
    kind = next((k for sig, k in SIGNATURES.items() if head.startswith(sig)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind == "PNG" and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        if width == 0 or height == 0:
            return f"zero-sized image ({width}x{height} pixels)"
    if kind is not None:
        return f"corrupt or truncated {kind} data (its header cannot be read)"
    if not head:
        return "empty file, not an image"
    return f"not an image in a format Pillow reads ({READABLE}, ...)"


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: zero-sized image ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels} pixels per image")


def _decode_fully(image, name: str, kind: str | None = None) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{name}: truncated or corrupt {kind or image.format or 'image'} data ({e})") from None


def resized_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) after the aspect-ratio-preserving resize: the largest size with at most
    `config.max_patches` patches and both sides multiples of k * patch_size (transformers'
    `get_aspect_ratio_preserving_size`, same float arithmetic)."""
    target_px = config.max_patches * config.patch_size ** 2
    factor = math.sqrt(target_px / (height * width))
    side = config.pooling_kernel_size * config.patch_size
    target_height = int(math.floor(factor * height / side)) * side
    target_width = int(math.floor(factor * width / side)) * side
    # A very long and thin image rounds one side to 0: one block of k patches across, the other
    # side as long as the aspect ratio asks, within the budget.  (Both sides cannot round to 0:
    # the ideal sides multiply to max_soft_tokens * side^2 with max_soft_tokens >= 70.)
    max_side = config.max_soft_tokens * side
    if target_height == 0:
        target_height, target_width = side, min(int(math.floor(width / height)) * side, max_side)
    elif target_width == 0:
        target_height, target_width = min(int(math.floor(height / width)) * side, max_side), side
    return target_height, target_width


def preprocess(images: Sequence[Any], config: ImageProcessorConfig) -> ImageBatch:
    """Resize, rescale, normalize, patchify and pad one or more PIL images (see the module docstring)."""
    pixel_values, positions, soft_tokens = [], [], []
    for index, image in enumerate(images):
        pixels = _to_array(image, config, index)                      # [3, H, W]
        patches = patchify(pixels, config.patch_size)                 # [hp * wp, p * p * 3]
        hp, wp = pixels.shape[1] // config.patch_size, pixels.shape[2] // config.patch_size
        if len(patches) > config.max_patches or hp % config.pooling_kernel_size or wp % config.pooling_kernel_size:
            raise ImageError(f"image {index + 1}: {pixels.shape[2]}x{pixels.shape[1]} pixels do not fit "
                             f"do_resize=false: sides must be multiples of pooling_kernel_size * patch_size "
                             f"= {config.pooling_kernel_size * config.patch_size} and hold at most "
                             f"{config.max_patches} patches")
        soft_tokens.append(len(patches) // config.pooling_kernel_size ** 2)
        x, y = np.meshgrid(np.arange(wp), np.arange(hp), indexing="xy")
        xy = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.int64)  # patch r * wp + c -> (c, r)
        pad = config.max_patches - len(patches)
        pixel_values.append(np.pad(patches, ((0, pad), (0, 0))))
        positions.append(np.pad(xy, ((0, pad), (0, 0)), constant_values=-1))
    return ImageBatch(np.stack(pixel_values), np.stack(positions), soft_tokens)


def patchify(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """[C, H, W] -> [(H/p) * (W/p), p * p * C]: patches in row-major order, each flattened as
    (row in patch, column in patch, channel)."""
    channels, height, width = pixels.shape
    hp, wp = height // patch_size, width // patch_size
    if hp * patch_size != height or wp * patch_size != width:
        raise ImageError(f"{width}x{height} pixels are not a whole number of {patch_size}x{patch_size} "
                         "patches (do_resize=false)")
    blocks = pixels.reshape(channels, hp, patch_size, wp, patch_size)   # [C, hp, p, wp, p]
    return blocks.transpose(1, 3, 2, 4, 0).reshape(hp * wp, -1)          # [hp, wp, p, p, C] -> rows


def _to_array(image, config: ImageProcessorConfig, index: int) -> np.ndarray:
    """One PIL image -> [3, H, W] float32 after RGB conversion, resize, rescale and normalize."""
    if config.do_convert_rgb:
        image = _to_rgb(image)
    elif image.mode != "RGB":
        raise ImageError(f"image {index + 1}: mode {image.mode} with do_convert_rgb=false; expected an RGB image")
    if config.do_resize:
        height, width = resized_size(image.height, image.width, config)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=config.resample)
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)        # [H, W, 3] -> [3, H, W]
    if config.do_rescale:
        pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)   # transformers would keep uint8 here; the values are the same
    if config.do_normalize:
        mean = np.array(config.image_mean, np.float32)[:, None, None]
        std = np.array(config.image_std, np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


def _to_rgb(image):
    """RGB, with any transparency composited onto white (transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
