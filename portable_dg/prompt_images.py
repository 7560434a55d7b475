"""A prompt's images as the model takes them: the processor's arrays (`processor.ProcessedPrompt`,
or transformers' Gemma4Processor output) checked against the model, turned into what the encoder's
first pass needs (`ImagePrompt`: soft tokens from the vision tower, placeholder slots, vision
blocks), and prefix-reuse keys that tell prompts with different images apart.

The arrays are transformers' (docs/vision.md §1): `pixel_values` [N, P, 3 * patch^2] float32 with
P = max_soft_tokens * k^2 patch rows per image, real patches first; `image_position_ids` [N, P, 2]
(x, y) per patch, (-1, -1) on padding rows; `mm_token_type_ids` [T] (1 on the image placeholders).
The i-th image's n_i = (real patches) / k^2 soft tokens replace, in order, the image placeholders
(`image_token_id`) of the prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError
from .image_processor import ImageError
from .models.diffusion_gemma import ImagePrompt, vision_blocks

KEY_MASK = (1 << 62) - 1
GOLDEN = 0x9E3779B97F4A7C15        # spreads one digest's keys over the key space


@dataclass
class PromptImages:
    """One prompt's checked image inputs."""

    pixel_values: np.ndarray | None     # [N, P, 3 * patch^2] float32 (None: no images, only blocks)
    image_position_ids: np.ndarray | None   # [N, P, 2] int64
    mm_token_type_ids: np.ndarray       # [T] int64
    soft_tokens: list[int]              # n_i per image
    placeholders: np.ndarray            # [sum n_i] positions of the image placeholders, ascending

    def image_of_slot(self) -> np.ndarray:
        """[sum n_i] the image each soft token (placeholder, in order) comes from."""
        return np.repeat(np.arange(len(self.soft_tokens)), self.soft_tokens)

    def for_encoder(self, vision: Any, start: int = 0) -> ImagePrompt:
        """What the encoder takes for prompt positions start..T-1: the soft tokens of every image
        with a placeholder there (computed now, by the vision tower, once per request), the slots
        and the vision blocks.  Images wholly before `start` (reused from a cache) are not run."""
        owner = self.image_of_slot()
        later = self.placeholders >= start
        needed = np.unique(owner[later])
        features = None
        slots = np.full(len(self.mm_token_type_ids) - start, -1, np.int64)
        if len(needed):
            parts = [vision.features(*self.real_patches(int(i))) for i in needed]
            features = vision.backend.concat(parts, 0) if len(parts) > 1 else parts[0]
            first = np.concatenate([[0], np.cumsum(self.soft_tokens)])               # first slot per image
            offsets = np.concatenate([[0], np.cumsum([self.soft_tokens[i] for i in needed])])
            row_of_image = dict(zip(needed.tolist(), offsets[:-1].tolist()))
            ranks = np.flatnonzero(later)
            slots[self.placeholders[later] - start] = [row_of_image[owner[r]] + r - first[owner[r]] for r in ranks]
        return ImagePrompt(features, slots, vision_blocks(self.mm_token_type_ids)[start:])

    def real_patches(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i's pixels [p, 3 * patch^2] and positions [p, 2] without the padding rows."""
        real = ~(self.image_position_ids[i] == -1).all(-1)
        return self.pixel_values[i][real], self.image_position_ids[i][real]

    def prefix_keys(self, ids: np.ndarray) -> np.ndarray:
        """ids [T] with every image placeholder and every vision-block token replaced by a negative
        key: placeholders by a hash of their image's arrays and their index in it, block tokens by
        a hash of their whole block and their index in it.  Two prompts share a key prefix only
        where their encoded caches are the same: same tokens, same images, whole blocks."""
        keys = np.array(ids, np.int64)
        if self.pixel_values is not None:
            owner = self.image_of_slot()
            for i in range(len(self.soft_tokens)):
                digest = array_digest(self.pixel_values[i], self.image_position_ids[i])
                keys[self.placeholders[owner == i]] = spread(digest, self.soft_tokens[i])
        blocks = vision_blocks(self.mm_token_type_ids)
        for b in np.unique(blocks[blocks >= 0]):
            span = np.flatnonzero(blocks == b)
            keys[span] = spread(array_digest(keys[span], self.mm_token_type_ids[span]), len(span))
        return keys


def array_digest(*arrays: np.ndarray) -> int:
    """A 64-bit digest of arrays' shapes, dtypes and bytes."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest(), "little")


def spread(digest: int, n: int) -> np.ndarray:
    """n distinct negative keys [n] int64 derived from a digest."""
    values = [(digest + j * GOLDEN) & KEY_MASK for j in range(n)]
    return -1 - np.array(values, np.int64)


def check_images(config: Any, vision: Any, ids: np.ndarray, pixel_values: Any, image_position_ids: Any,
                 mm_token_type_ids: Any) -> PromptImages | None:
    """The image inputs of a prompt (ids [T]) checked against the model; None for a text prompt.

    Raises ConfigError when the model has no vision tower, ImageError (one line, naming the array)
    when the arrays do not fit each other, the prompt or the vision config."""
    if pixel_values is None and image_position_ids is None and mm_token_type_ids is None:
        return None
    if (pixel_values is None) != (image_position_ids is None):
        raise ImageError("pixel_values and image_position_ids go together (the processor makes both)")
    types = token_types(mm_token_type_ids, len(ids))
    if pixel_values is None:
        return None if not types.any() else PromptImages(None, None, types, [], np.zeros(0, np.int64))
    if vision is None:
        raise ConfigError("this model has no vision tower (no vision_config, or no vision tensors in the "
                          "checkpoint): it cannot take images")
    if mm_token_type_ids is None:
        raise ImageError("mm_token_type_ids is required with pixel_values (the processor's array: it marks "
                         "the image tokens, which attend to each other)")
    pixels, positions = patch_arrays(vision.config, pixel_values, image_position_ids)
    soft_tokens = [image_soft_tokens(vision.config, positions[i], i) for i in range(len(pixels))]
    placeholders = np.flatnonzero(ids == config.image_token_id)
    if len(placeholders) != sum(soft_tokens):
        raise ImageError(f"the prompt has {len(placeholders)} image tokens (id {config.image_token_id}) but "
                         f"the {len(soft_tokens)} image(s) make {sum(soft_tokens)} soft tokens "
                         f"({', '.join(map(str, soft_tokens))}); give the processor's input_ids with its images")
    return PromptImages(pixels, positions, types, soft_tokens, placeholders)


def token_types(mm_token_type_ids: Any, length: int) -> np.ndarray:
    """mm_token_type_ids as [T] int64 (a [1, T] batch of one accepted); zeros when None."""
    if mm_token_type_ids is None:
        return np.zeros(length, np.int64)
    types = np.asarray(mm_token_type_ids)
    if types.ndim == 2 and types.shape[0] == 1:
        types = types[0]
    if types.shape != (length,) or (types.size and types.dtype.kind not in "iu"):
        raise ImageError(f"mm_token_type_ids must be {length} integers (one per prompt token), got shape "
                         f"{list(types.shape)} of {types.dtype}")
    if types.size and (types.min() < 0 or types.max() > 2):
        raise ImageError("mm_token_type_ids: values must be 0 (text), 1 (image) or 2 (video); this model "
                         f"takes no audio (got {int(types.min())}..{int(types.max())})")
    return types.astype(np.int64)


def patch_arrays(vcfg: Any, pixel_values: Any, image_position_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values as [N, P, 3 * patch^2] float32 and image_position_ids as [N, P, 2] int64."""
    pixels, positions = np.asarray(pixel_values), np.asarray(image_position_ids)
    k2, width = vcfg.pooling_kernel_size ** 2, 3 * vcfg.patch_size ** 2
    if pixels.ndim != 3 or pixels.shape[2] != width or pixels.dtype.kind != "f" or pixels.shape[0] == 0:
        raise ImageError(f"pixel_values must be [images, patches, {width}] floats (patch size "
                         f"{vcfg.patch_size}), got shape {list(pixels.shape)} of {pixels.dtype}")
    if pixels.shape[1] % k2:
        raise ImageError(f"pixel_values has {pixels.shape[1]} patch rows per image, not a multiple of "
                         f"{k2} (pooling kernel {vcfg.pooling_kernel_size} squared)")
    if positions.shape != (*pixels.shape[:2], 2) or positions.dtype.kind not in "iu":
        raise ImageError(f"image_position_ids must be integers of shape {[*pixels.shape[:2], 2]} (x, y per "
                         f"patch row of pixel_values), got {list(positions.shape)} of {positions.dtype}")
    return pixels.astype(np.float32, copy=False), positions.astype(np.int64)


def image_soft_tokens(vcfg: Any, positions: np.ndarray, i: int) -> int:
    """Soft tokens of image i from its patch positions [P, 2]: the real patches (not (-1, -1)) must
    form a full grid whose sides are multiples of the pooling kernel and fit the position table."""
    k = vcfg.pooling_kernel_size
    real = positions[~(positions == -1).all(-1)]
    name = f"image_position_ids[{i}]"
    if len(real) == 0:
        raise ImageError(f"{name}: the image has no patches (every row is padding)")
    if real.min() < 0 or real.max() >= vcfg.position_embedding_size:
        raise ImageError(f"{name}: patch positions must lie in [0, {vcfg.position_embedding_size}) "
                         f"(the vision tower's position table), got {int(real.min())}..{int(real.max())}")
    width, height = int(real[:, 0].max()) + 1, int(real[:, 1].max()) + 1
    cells = np.unique(real[:, 1] * width + real[:, 0])
    if len(real) != width * height or len(cells) != width * height or width % k or height % k:
        raise ImageError(f"{name}: the {len(real)} patches do not form a full grid of columns x rows, both "
                         f"multiples of the pooling kernel {k} (as the image processor makes them)")
    return len(real) // (k * k)
