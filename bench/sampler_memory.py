"""Peak host memory of generation at the released vocabulary, against the sampler's bound of two
[B, L, V] float32 arrays (DESIGN.md: "at most two [canvas, vocab] float32 arrays per sequence alive
at any time, temporaries included").

    pdg synth /tmp/released-2L --like released --layers 2
    .venv/bin/python bench/sampler_memory.py --model /tmp/released-2L --backend numpy --batch 1 4

For each batch size: load once, run one warm-up generation, then measure a generation of one
canvas at fixed steps (prefill, steps, no commit): its peak resident memory above the resident
memory just before it (Linux VmHWM after a reset of the peak counter).  That is what the pass and
the sampler allocate on top of the weights: logits, the sampler's temporaries, the KV cache and
the activations of the two small layers.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import portable_dg
from portable_dg.bench import peak_rss_bytes, reset_peak_rss


def resident_bytes() -> int:
    """Current resident memory (VmRSS) of this process."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(model, batch: int, steps: int) -> dict:
    """Peak extra memory of one fixed-step canvas for `batch` sequences (after a warm-up run)."""
    L, V = model.canvas_length, model.config.vocab_size
    prompts = [np.arange(5, 69) + b for b in range(batch)]
    options = dict(max_new_tokens=L, max_denoising_steps=steps, stability_threshold=steps + 1, seed=0)
    portable_dg.generate_batch(model, prompts, **options)
    before = resident_bytes()
    reset_peak_rss()
    portable_dg.generate_batch(model, prompts, **options)
    extra = peak_rss_bytes() - before
    array = batch * L * V * 4
    return {"batch": batch, "steps": steps, "peak_extra_bytes": extra, "logits_array_bytes": array,
            "peak_extra_in_arrays": extra / array, "within_two_arrays": extra <= 2 * array}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    options = {} if args.dtype is None else {"dtype": args.dtype}
    model = portable_dg.load(args.model, backend=args.backend, **options)
    results = [measure(model, b, args.steps) for b in args.batch]
    print(json.dumps({"model": args.model, "backend": model.backend.name, "dtype": model.backend.compute_dtype,
                      "vocab": model.config.vocab_size, "canvas": model.canvas_length, "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
