"""The transformers reference on a Sudoku checkpoint, made deterministic (spec §7.3): the canvas
noise is a fixed pattern and `torch.multinomial` the argmax, on transformers' side by patching it.
Comparison scaffolding, kept out of the runtime package; `bench/sudoku_matrix.py` uses it.

    ours = sd.evaluate(model, pairs, noise=pattern_noise(V), greedy=True)
    theirs = reference_evaluate(path, pairs)          # identical answers expected
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from portable_dg.sudoku import CELLS, PROMPT_LENGTH, Evaluation, grid_from_ids, prompt_ids, score


def reference_evaluate(path: str | Path, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *,
                       max_denoising_steps: int | None = None,
                       progress: Callable[[int], Any] | None = None) -> Evaluation:
    """The transformers reference on the same checkpoint, made deterministic (spec §7.3): the
    canvas noise is `noise_pattern` and `torch.multinomial` is the argmax.  Needs torch and
    transformers; compare with `evaluate(..., noise=pattern_noise(V), greedy=True)`.
    max_denoising_steps: None keeps the checkpoint's generation config."""
    try:
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_generation
    except ImportError:
        raise SystemExit("the transformers reference needs torch and transformers installed")

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval()
    vocab_size, length = hf.config.text_config.vocab_size, hf.config.canvas_length
    fixed = torch.from_numpy(noise_pattern(length, vocab_size))

    def initialize_canvas(self, batch_size, device):
        return fixed.to(device)[None].expand(batch_size, length).clone()

    def argmax_multinomial(probs, num_samples, *args, **kwargs):
        return probs.argmax(dim=-1, keepdim=True)

    saved = hf_generation.EntropyBoundSampler.initialize_canvas, torch.multinomial
    hf_generation.EntropyBoundSampler.initialize_canvas = initialize_canvas
    torch.multinomial = argmax_multinomial
    answers, steps = [], []
    try:
        for i, (puzzle, _) in enumerate(pairs):
            calls = []
            forward = hf.forward

            def counting_forward(*args, **kwargs):
                calls.append(1)                                # one decoder pass per denoising step
                return forward(*args, **kwargs)

            hf.forward = counting_forward
            with torch.no_grad():
                out = hf.generate(torch.from_numpy(prompt_ids(puzzle))[None], max_new_tokens=CELLS,
                                  **({"max_denoising_steps": max_denoising_steps} if max_denoising_steps else {}))
            del hf.forward
            answers.append(grid_from_ids(out.sequences[0, PROMPT_LENGTH:].numpy()))
            steps.append(len(calls))
            if progress is not None:
                progress(i + 1)
    finally:
        hf_generation.EntropyBoundSampler.initialize_canvas, torch.multinomial = saved
    return score(pairs, answers, steps)


def noise_pattern(n: int, vocab_size: int) -> np.ndarray:
    """The deterministic stand-in for canvas noise (spec §7.3): (37 j + 5) mod V."""
    return (37 * np.arange(n, dtype=np.int64) + 5) % vocab_size


def pattern_noise(vocab_size: int) -> Callable[[int], np.ndarray]:
    """A NoiseSource that always returns `noise_pattern`."""
    return lambda n: noise_pattern(n, vocab_size)
