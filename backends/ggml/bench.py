"""Product throughput of the ggml backend's two routes on DiffusionGemma shapes (GFLOP/s).

    python -m portable_dg.backends.ggml.bench [--threads N] [--tokens 256] [--repeat 5]

For each shape and weight type it times `linear` / `expert_linear` in ggml (`ggml_mul_mat`,
`ggml_mul_mat_id`) and as dequantized tiles through numpy's BLAS, next to numpy's float32 product
on a dequantized copy (the upper bound the BLAS route approaches).  Random weights; the routes are
interleaved and the best of `repeat` runs is kept, to damp noise from other processes.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

# (label, E or None, out, in): the released model's dense, expert and head products
SHAPES = [("q/gate 2816->2112", None, 2112, 2816), ("down 2112->2816", None, 2816, 2112),
          ("experts gate_up 2816->1408 x128", 128, 1408, 2816),
          ("experts down 704->2816 x128", 128, 2816, 704)]
TYPES = ["F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K"]


def best_time(f: Callable[[], object], repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import ggml

    from portable_dg.backends.ggml import create
    from portable_dg.backends.ggml.engine import quantize
    from portable_dg.backends.numpy import NumpyBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    in_ggml = create(n_threads=args.threads, device="cpu", blas_min_tokens=10 ** 9)
    in_blas = create(n_threads=args.threads, device="cpu", blas_min_tokens=1)
    rng = np.random.default_rng(0)
    T, k = args.tokens, 8
    print(f"{T} tokens, {in_ggml.engine.device} ggml threads {args.threads or 'all'}; GFLOP/s")
    print(f"{'shape':34s} {'type':5s} {'numpy f32':>9s} {'ggml':>7s} {'BLAS tiles':>10s}")
    for label, E, out, n in SHAPES:
        shape = (out, n) if E is None else (E, out, n)
        w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        x = rng.standard_normal((T, n)).astype(np.float32)
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if E else None
        flops = 2 * T * out * n * (k if E else 1)
        for name in TYPES:
            qtype = getattr(ggml, f"GGML_TYPE_{name}")
            if n % ggml.ggml_blck_size(qtype):
                continue                        # llama.cpp falls back to another type here
            host = w if name == "F32" else quantize(w, qtype)
            weights = {b: b.engine.weight(host, qtype, shape) for b in (in_ggml, in_blas)}
            if E is None:
                run = {b: (lambda b=b: b.linear(x, weights[b])) for b in weights}
                reference = lambda: x @ w.T  # noqa: E731
            else:
                run = {b: (lambda b=b: b.expert_linear(x, weights[b], ids)) for b in weights}
                reference = lambda: NumpyBackend.expert_linear(in_blas, x, w, ids)  # noqa: E731
            rates = [flops / best_time(f, args.repeat) / 1e9 for f in (reference, run[in_ggml], run[in_blas])]
            print(f"{label:34s} {name:5s} {rates[0]:9.0f} {rates[1]:7.0f} {rates[2]:10.0f}", flush=True)


if __name__ == "__main__":
    main()
