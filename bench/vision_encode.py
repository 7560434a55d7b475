"""Time to encode one image with the vision tower and projector at the released geometry, per backend.

    .venv/bin/python bench/vision_encode.py [--backends numpy,torch,mlx,ggml] [--repeat 3] [--size 480x640]

The released DiffusionGemma vision tower (1152 wide, 27 layers, 16 heads of 72, MLP 4304, patch 16,
pooling kernel 3, projection to 2816) with synthetic random weights, float32, on one image of
--size pixels (height x width) resized as the processor resizes it (480 x 640 -> 672 x 912: 2394
patches, 266 soft tokens), timed from the processor's arrays to the soft tokens on the host
(`Gemma4Vision.features` plus the read back).  Each backend runs --repeat times after one warm-up
run; the median, min and max are printed with the GFLOP/s of the median (about 3.3 TFLOP an image).
Backends run one after the other in this process; the weights take 2.3 GB per backend.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from portable_dg.backends import available, get_backend
from portable_dg.checkpoint import expected_vision_tensors
from portable_dg.config import DiffusionGemmaConfig, VisionConfig
from portable_dg.image_processor import ImageProcessorConfig, patchify, resized_size
from portable_dg.models.gemma4_vision import Gemma4Vision

RELEASED = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                        standardize=True)
OPTIONS = {"numpy": {}, "torch": {}, "mlx": {"dtype": "float32"}, "ggml": {}}


def synthetic_weights(config: DiffusionGemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of every vision tensor: linears N(0, 1/in), norms and scales near 1."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_vision_tensors(config).items():
        if len(shape) == 1:
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (rng.standard_normal(shape, np.float32) / np.float32(shape[-1] ** 0.5))
    return weights


def image_arrays(height: int, width: int, vision: VisionConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [P, 3 p^2] and positions [P, 2] of a random image resized as the processor does."""
    image = ImageProcessorConfig(patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size)
    th, tw = resized_size(height, width, image)
    pixels = np.random.default_rng(seed).random((3, th, tw), np.float32)
    rows, cols = th // vision.patch_size, tw // vision.patch_size
    positions = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2)   # (x, y), row-major
    return patchify(pixels, vision.patch_size), positions


def flops(vision: VisionConfig, patches: int, text_hidden: int) -> float:
    """Multiply-adds x 2 of one image: patch embedding, per layer q/k/v/o, MLP and attention, projection."""
    D, F, heads = vision.hidden_size, vision.intermediate_size, vision.num_attention_heads * vision.head_dim
    kv = vision.num_key_value_heads * vision.head_dim
    layer = 2 * patches * D * (2 * heads + 2 * kv) + 6 * patches * D * F + 4 * patches ** 2 * heads
    tokens = patches // vision.pooling_kernel_size ** 2
    embed = 2 * patches * 3 * vision.patch_size ** 2 * D
    return embed + vision.num_hidden_layers * layer + 2 * tokens * D * text_hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy,torch,mlx,ggml")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", default="480x640", help="image height x width in pixels")
    parser.add_argument("--layers", type=int, default=RELEASED.num_hidden_layers, help="fewer for a quick check")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    vision = VisionConfig(**{**RELEASED.__dict__, "num_hidden_layers": args.layers})
    config = DiffusionGemmaConfig(vision=vision)
    pixels, positions = image_arrays(height, width, vision)
    total = flops(vision, len(pixels), config.hidden_size)
    print(f"image {height}x{width} -> {len(pixels)} patches, {len(pixels) // vision.pooling_kernel_size ** 2} "
          f"soft tokens; "
          f"{vision.num_hidden_layers} layers; {total / 1e12:.2f} TFLOP")
    print("| backend | median s | min s | max s | GFLOP/s (median) |")
    print("|---|---|---|---|---|")
    host = synthetic_weights(config)
    for name in args.backends.split(","):
        if not available(name):
            print(f"| {name} | unavailable | | | |")
            continue
        backend = get_backend(name, **OPTIONS[name])
        tower = Gemma4Vision(vision, {n: backend.weight(n, w) for n, w in host.items()}, backend)
        times = []
        for _ in range(args.repeat + 1):                 # the first run warms up
            start = time.perf_counter()
            backend.to_numpy(tower.features(pixels, positions))
            times.append(time.perf_counter() - start)
        times = times[1:]
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {min(times):.2f} | {max(times):.2f} | {total / median / 1e9:.0f} |",
              flush=True)
        del tower, backend
        gc.collect()


if __name__ == "__main__":
    main()
