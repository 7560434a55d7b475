"""Importance matrices for GGUF quantization, gathered with our own numpy model (`pdg imatrix`).

llama.cpp's imatrix idea applied to a diffusion model: run the encoder over calibration prompts and
the denoising passes of generating one canvas after each, and accumulate, for every linear and
expert input, the mean of x^2 per input column (per expert for the stacked experts, over the tokens
routed to it).  ggml's quantizers weight each column's rounding error by it.

The file is a .npz keyed by GGUF tensor name: float32 [in] for a matrix, [E, in] for an expert
tensor (experts that saw no token get the mean over the others), plus `<name>.count` (tokens seen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from portable_dg.backends.numpy import NumpyBackend
from portable_dg.errors import ConfigError

from .gguf_names import gguf_name


class RecordingBackend(NumpyBackend):
    """The numpy backend, summing x^2 per input column of every `linear` / `expert_linear` call."""

    name = "numpy-imatrix"

    def __init__(self) -> None:
        super().__init__("float32")
        self.weight_names: dict[int, str] = {}      # id(weight array) -> canonical name
        self.sums: dict[str, np.ndarray] = {}       # name -> float64 [in] or [E, in]
        self.counts: dict[str, np.ndarray] = {}     # name -> int64 [] or [E]

    def weight(self, name: str, value: Any) -> np.ndarray:
        w = super().weight(name, value)
        if w.ndim >= 2:
            self.weight_names[id(w)] = name
        return w

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        name = self.weight_names[id(w)]
        x2 = np.square(x, dtype=np.float64).reshape(-1, x.shape[-1])     # [T, in]
        self.sums[name] = self.sums.get(name, 0) + x2.sum(0)
        self.counts[name] = self.counts.get(name, 0) + x2.shape[0]
        return super().linear(x, w)

    def expert_linear(self, x: np.ndarray, w: np.ndarray, ids: np.ndarray) -> np.ndarray:
        name, (E, n) = self.weight_names[id(w)], (w.shape[0], x.shape[-1])
        T, k = ids.shape
        x2 = np.square(x, dtype=np.float64)
        rows = np.repeat(x2, k, axis=0) if x.ndim == 2 else x2.reshape(T * k, n)  # [T*k, in]
        flat_ids = np.asarray(ids).reshape(-1)                                    # [T*k]
        sums = self.sums.setdefault(name, np.zeros((E, n)))
        np.add.at(sums, flat_ids, rows)
        self.counts[name] = self.counts.get(name, 0) + np.bincount(flat_ids, minlength=E)
        return super().expert_linear(x, w, ids)

    def importance(self) -> dict[str, np.ndarray]:
        """GGUF name -> mean x^2 per column (float32), and `<name>.count`."""
        out = {}
        for name, total in self.sums.items():
            count = np.asarray(self.counts[name])
            if total.ndim == 2:
                seen = count > 0
                mean = np.empty_like(total)
                mean[seen] = total[seen] / count[seen, None]
                mean[~seen] = mean[seen].mean(0) if seen.any() else 1.0
            else:
                mean = total / max(int(count), 1)
            key = gguf_name(name)
            out[key] = mean.astype(np.float32)
            out[key + ".count"] = count.astype(np.int64)
        return out


def compute_imatrix(model_path: str | Path, out: str | Path, prompts: Sequence[str] | None = None, *,
                    n_random: int = 8, prompt_length: int = 32, steps: int | None = None,
                    seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    """Gather an importance matrix by running the numpy model and save it as .npz.

    Args:
        model_path: an HF checkpoint (or any format `portable_dg.load` reads).
        out: the .npz file to write (an existing file only with `force`).
        prompts: calibration texts (need the checkpoint's tokenizer; blank ones are skipped, and
            at least one must remain); None: `n_random` prompts of `prompt_length` random token ids.
        steps: denoising steps per canvas (default: the checkpoint's).
        progress: report progress on stderr, one tick per denoising step.
    Returns: the output path."""
    import portable_dg
    from portable_dg.outputs import check_new_file, output_file
    from portable_dg.progress import Progress
    from portable_dg.sampler import generate

    check_new_file(out, force=force)
    if steps is not None and steps <= 0:
        raise ConfigError(f"--steps must be positive, got {steps}")
    backend = RecordingBackend()
    model = portable_dg.load(model_path, backend=backend)
    calibration = _calibration_ids(model, prompts, n_random, prompt_length, seed)
    per_canvas = steps or model.generation_config.max_denoising_steps
    with Progress(len(calibration) * per_canvas, "imatrix", "step", enabled=progress) as bar:
        for i, ids in enumerate(calibration):
            done = generate(model, ids, max_new_tokens=model.canvas_length, max_denoising_steps=steps,
                            seed=seed + i, on_step=lambda info: bar.update(1))
            bar.update(per_canvas - done.steps[0])                # a canvas that stopped early
    with output_file(out, force=force, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **backend.importance())
    return Path(out)


def _calibration_ids(model: Any, prompts: Sequence[str] | None, n_random: int, length: int,
                     seed: int) -> list[np.ndarray]:
    """Token ids of the calibration prompts (blank lines skipped), or n_random random prompts."""
    if prompts is not None:
        texts = [p for p in prompts if p.strip()]
        if not texts:
            raise ConfigError("the calibration prompts are all blank; give some text, or omit --prompts "
                              "to calibrate on random token ids")
        if model.tokenizer is None:
            raise ConfigError("calibration prompts need a tokenizer; this checkpoint has none "
                              "(omit --prompts to calibrate on random token ids)")
        return [np.asarray(model.tokenizer.encode(p, add_special_tokens=True)) for p in texts]
    if n_random <= 0 or length <= 0:
        raise ConfigError(f"--n-random must be positive (got {n_random}): an importance matrix needs "
                          "at least one calibration prompt")
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.config.vocab_size, size=length) for _ in range(n_random)]
