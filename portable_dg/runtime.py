"""The public model API: `load` a checkpoint onto a backend, `Model.start` a context, `denoise`.

    model = portable_dg.load("path/or/repo-id", backend="numpy")
    ctx = model.start(prompt_ids)              # encoder pass over the prompt
    ctx = model.start(**processor_arrays)      # ... with images: the processor's numpy arrays
    logits = ctx.denoise(canvas_ids)           # [L, V] float32, soft-capped
    ctx.commit(block_ids)                      # encoder pass over a finished block

A Context is one sequence over a one-row KV cache; `portable_dg.engine.Engine` runs many at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backend import Array, Backend
from .checkpoint import VISION_PROJECTION
from .config import DiffusionGemmaConfig, GenerationConfig
from .errors import ConfigError
from .models.diffusion_gemma import DiffusionGemma, KVCache
from .models.gemma4_vision import Gemma4Vision
from .prompt_images import PromptImages, check_images
from .source import ModelSource, open_source
from .tokenizer import Tokenizer


class Model:
    """A loaded model: the network on a backend, its tokenizer and its generation defaults."""

    def __init__(self, source: ModelSource, backend: Backend, max_context: int = 0):
        self.source = source
        self.backend = backend
        self.max_context = max_context      # KV cache positions preallocated per sequence
        self.config: DiffusionGemmaConfig = source.config
        self.generation_config: GenerationConfig = source.generation
        self.tokenizer: Tokenizer | None = source.tokenizer
        stored = getattr(source.tensors, "stored", source.tensors.__getitem__)
        weights = {name: backend.weight(name, stored(name)) for name in source.tensors}
        self.network = DiffusionGemma(self.config, weights, backend)
        # the vision tower and projector, when the checkpoint has them (None: text only)
        self.vision = (Gemma4Vision(self.config.vision, weights, backend)
                       if self.config.vision is not None and VISION_PROJECTION in weights else None)

    @property
    def canvas_length(self) -> int:
        """Tokens per canvas (block)."""
        return self.config.canvas_length

    def start(self, prompt_ids: Sequence[int] | np.ndarray, pixel_values: np.ndarray | None = None,
              image_position_ids: np.ndarray | None = None,
              mm_token_type_ids: np.ndarray | None = None) -> "Context":
        """Run the encoder over the prompt; the returned context denoises canvases after it.

        With images, give the processor's arrays (`portable_dg.processor.Processor`, or
        transformers' Gemma4Processor, as numpy): prompt_ids with each image expanded to its
        placeholders, pixel_values [N, P, 3 * patch^2], image_position_ids [N, P, 2] and
        mm_token_type_ids [T].  The vision tower runs here, once."""
        ids = self.check_ids(prompt_ids, "prompt_ids")
        if len(ids) == 0:
            raise ConfigError("prompt_ids is empty: the encoder needs at least one token")
        self.check_positions(0, len(ids), "prompt_ids")
        images = self.check_images(ids, pixel_values, image_position_ids, mm_token_type_ids)
        ctx = Context(self, self.network.make_cache(1, max(self.max_context, len(ids))))
        if images is None:
            self.network.encode(ids[None], ctx.cache, [0])
        else:
            self.network.encode(ids[None], ctx.cache, [0], [images.for_encoder(self.vision)])
        return ctx

    def check_images(self, ids: np.ndarray, pixel_values: Any = None, image_position_ids: Any = None,
                     mm_token_type_ids: Any = None) -> PromptImages | None:
        """A prompt's image arrays checked against it and the model (None: a text prompt)."""
        return check_images(self.config, self.vision, ids, pixel_values, image_position_ids, mm_token_type_ids)

    def check_positions(self, start: int, count: int, what: str) -> None:
        """Positions start..start+count-1 must lie inside the model's context."""
        limit = self.config.max_position_embeddings
        if start + count > limit:
            raise ConfigError(f"{what}: {count} tokens at position {start} exceed the model's context "
                              f"of {limit} positions (max_position_embeddings)")

    def check_ids(self, ids: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
        """ids as a 1-D int64 array, each in [0, vocab_size)."""
        arr = np.asarray(ids)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ConfigError(f"{what} must be a 1-D sequence of integer token ids, got shape "
                              f"{list(arr.shape)} of {arr.dtype}")
        V = self.config.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= V):
            raise ConfigError(f"{what}: token ids must lie in [0, {V}), got {int(arr.min())}..{int(arr.max())}")
        return arr.astype(np.int64)


class Context:
    """The encoded context of one sequence (row 0 of a KV cache) and the passes that use it."""

    def __init__(self, model: Model, cache: KVCache):
        self.model = model
        self.cache = cache

    @property
    def length(self) -> int:
        """Tokens encoded so far (the position of the next canvas's first token)."""
        return int(self.cache.lengths[0])

    def denoise_device(self, canvas: Array, self_conditioning: Array | None = None) -> Array:
        """`denoise` on backend arrays: canvas [L] ids -> logits [L, V]; self_conditioning: the
        previous step's temperature-scaled logits [L, V] on the device, or None."""
        network = self.model.network
        frame = network.frame(self.cache, [0], canvas.shape[0], decoder=True)
        soft = None if self_conditioning is None else network.condition(self_conditioning[None])
        return network.denoise(canvas[None], frame, soft)[0]

    def denoise(self, canvas_ids: Sequence[int] | np.ndarray,
                self_conditioning: np.ndarray | None = None) -> np.ndarray:
        """One decoder pass over a canvas -> float32 logits [canvas_len, vocab] after soft-capping.

        self_conditioning: the previous step's temperature-scaled logits [canvas_len, vocab]."""
        B = self.model.backend
        canvas = self.model.check_ids(canvas_ids, "canvas_ids")
        self.model.check_positions(self.length, len(canvas), "canvas_ids")
        sc = None
        if self_conditioning is not None:
            sc_arr = np.asarray(self_conditioning)
            if sc_arr.shape != (len(canvas), self.model.config.vocab_size):
                raise ConfigError(f"self_conditioning must have shape "
                                  f"{[len(canvas), self.model.config.vocab_size]}, got {list(sc_arr.shape)}")
            sc = B.asarray(sc_arr.astype(np.float32))
        logits = self.denoise_device(B.asarray(canvas), sc)
        return np.asarray(B.to_numpy(logits), dtype=np.float32)

    def commit(self, block_ids: Sequence[int] | np.ndarray) -> None:
        """Encoder pass over a finished block at the next positions (appends it to the cache)."""
        ids = self.model.check_ids(block_ids, "block_ids")
        self.model.check_positions(self.length, len(ids), "block_ids")
        self.model.network.encode(ids[None], self.cache, [0])


def load(path_or_repo_id: str | Path, backend: str | Backend = "auto", max_context: int = 0,
         check_memory: bool = True, mmproj: str | Path | None = None, **backend_options: Any) -> Model:
    """Load a checkpoint (HF directory, GGUF file, MLX directory or hub repo id) onto a backend.

    backend: "auto" (`portable_dg.backends.auto_backend`), a name ("numpy", "mlx", "ggml",
    "torch") or a Backend instance; backend_options go to the backend's factory (e.g.
    dtype="float64" for numpy, device="cuda" for torch) and override auto's choices.
    max_context: KV cache positions to preallocate per sequence (it grows in chunks beyond).
    check_memory: refuse, with the alternatives, a load whose weights would not fit in memory.
    mmproj: a vision projector GGUF file (llama.cpp's layout, `pdg convert --to mmproj`) giving a
    model without its own vision tower (a GGUF file) one."""
    from .backends import auto_backend, get_backend

    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 0:
        raise ConfigError(f"max_context must be a non-negative integer, got {max_context!r}")
    source = open_source(path_or_repo_id)
    if mmproj is not None:
        from .converters.gguf_mmproj import attach_mmproj

        source = attach_mmproj(source, mmproj)
    if backend == "auto":
        backend, chosen = auto_backend(source)
        backend_options = {**chosen, **backend_options}
    instance = get_backend(backend, **backend_options) if isinstance(backend, str) else backend
    if check_memory:
        check_fits(source, instance)
    return Model(source, instance, max_context)


def check_fits(source: ModelSource, backend: Backend) -> None:
    """Raise ConfigError when the backend's copy of the weights would not fit in the memory it
    loads them into (the host's available memory, or the GPU's), naming the alternatives."""
    need = weight_bytes(source, backend)
    have, where = available_memory(backend)
    if have is None or need <= 0.9 * have:
        return
    gib = 2 ** 30
    raise ConfigError(
        f"{source.path}: the weights need about {need / gib:.1f} GiB on the {backend.name} backend "
        f"({backend.compute_dtype}), more than the {have / gib:.1f} GiB of {where} available; convert to "
        f"GGUF (pdg convert MODEL out.gguf --to gguf --quant Q4_K_M) and use the ggml backend, or use "
        f"--backend torch --dtype bfloat16 (pass check_memory=False to try anyway)")


def weight_bytes(source: ModelSource, backend: Backend) -> int:
    """Bytes of the backend's copy of the weights when it converts them to its compute dtype (0 when
    it keeps this format's quantized tensors as they are: they take at most the file's size)."""
    import importlib

    module = importlib.import_module(type(backend).__module__)
    if source.format != "hf" and source.format in getattr(module, "FORMATS", ()):
        return 0
    itemsize = 2 if backend.compute_dtype in ("bfloat16", "float16") else np.dtype(backend.compute_dtype).itemsize
    refs = getattr(source.tensors, "refs", source.tensors)
    return sum(int(np.prod(refs[name].shape, dtype=np.int64)) for name in source.tensors) * itemsize


def available_memory(backend: Backend) -> tuple[int | None, str]:
    """(bytes, "where") the backend's weights go: a CUDA device's free memory, else the host's."""
    device = getattr(backend, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"GPU memory on {device}"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable"), "host memory"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None, "host memory"
