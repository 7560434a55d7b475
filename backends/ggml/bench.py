"""Speed of the ggml backend: product throughput (GFLOP/s) and ms per denoising step.

    python -m portable_dg.backends.ggml.bench [--threads N] [--tokens 256] [--repeat 5]
    python -m portable_dg.backends.ggml.bench --random-checkpoint DIR     # 2816 wide, 2 layers, 32k vocab
    python -m portable_dg.backends.ggml.bench --step MODEL [--backend ggml] [ggml options as k=v]

Products: for each shape and weight type it times `linear` / `expert_linear` in ggml
(`ggml_mul_mat`, `ggml_mul_mat_id`) and the alternative the backend rejects for quantized weights,
dequantized row tiles (per expert, for the experts) through numpy's BLAS, next to numpy's float32
product on a dequantized copy (the upper bound of that alternative).  Random weights;
the best of `repeat` runs is kept, to damp noise from other processes.  Steps: the best of
`repeat` self-conditioned denoising steps of one canvas after a 64-token prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

# (label, E or None, out, in): the released model's dense, expert and head products
SHAPES = [("q/gate 2816->2112", None, 2112, 2816), ("down 2112->2816", None, 2816, 2112),
          ("experts gate_up 2816->1408 x128", 128, 1408, 2816),
          ("experts down 704->2816 x128", 128, 2816, 704)]
TYPES = ["F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K"]


# The released model's widths with 2 layers and a 32k vocabulary (random weights, float32: 7 GB).
REALISTIC = dict(model_type="diffusion_gemma_text", vocab_size=32768, hidden_size=2816, intermediate_size=2112,
                 moe_intermediate_size=704, num_experts=128, top_k_experts=8, num_hidden_layers=2,
                 layer_types=["sliding_attention", "full_attention"], num_attention_heads=16,
                 num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                 sliding_window=1024, canvas_length=256, eos_token_id=[1], pad_token_id=0, bos_token_id=2)


def random_checkpoint(path: Path) -> Path:
    """Write a float32 checkpoint of REALISTIC's geometry with variance-preserving random weights."""
    from safetensors.numpy import save_file

    from portable_dg.checkpoint import expected_tensors
    from portable_dg.config import DiffusionGemmaConfig

    rng = np.random.default_rng(0)
    tensors = {name: (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32) if len(shape) == 1
               else shape[-1] ** -0.5 * rng.standard_normal(shape, dtype=np.float32)
               for name, shape in expected_tensors(DiffusionGemmaConfig.from_dict(REALISTIC)).items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(REALISTIC))
    return path


def step_ms(model_path: str, backend: str, options: dict, repeat: int) -> float:
    """Best time in ms of a self-conditioned denoising step of one canvas after a 64-token prompt."""
    import portable_dg

    model = portable_dg.load(model_path, backend=backend, **options)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    ctx = model.start(rng.integers(0, V, 64))
    canvas = rng.integers(0, V, model.canvas_length)
    logits = ctx.denoise(canvas)
    return 1e3 * best_time(lambda: ctx.denoise(canvas, logits / 0.8), repeat)


def best_time(f: Callable[[], object], repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def tiles_blas(backend, x: np.ndarray, w) -> np.ndarray:
    """x @ w.T with w dequantized tile by tile (the rejected route for quantized weights)."""
    from portable_dg.backends.ggml import tiles

    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    for start, stop in tiles(w, w.shape[0]):
        y[:, start:stop] = x @ backend.float_rows(w, start, stop).T
    return y


def experts_blas(backend, x: np.ndarray, w, ids: np.ndarray) -> np.ndarray:
    """expert_linear with each used expert dequantized and one BLAS GEMM per expert."""
    T, k = ids.shape
    out = w.shape[1]
    y = np.empty((T, k, out), np.float32)
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        y[t, j] = x[t] @ backend.float_rows(w, int(e) * out, (int(e) + 1) * out).T
    return y


def products(threads: int | None, T: int, repeat: int) -> None:
    """Print the GFLOP/s table of both routes on SHAPES x TYPES."""
    import ggml

    from portable_dg.backends.ggml import create
    from portable_dg.backends.ggml.engine import quantize
    from portable_dg.backends.numpy import NumpyBackend

    backend = create(n_threads=threads, device="cpu", blas_min_tokens=10 ** 9)
    rng = np.random.default_rng(0)
    k = 8
    print(f"{T} tokens, {backend.engine.device} ggml threads {threads or 'all'}; GFLOP/s")
    print(f"{'shape':34s} {'type':5s} {'numpy f32':>9s} {'ggml':>7s} {'tiles+BLAS':>10s}")
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
            W = backend.engine.weight(host, qtype, shape)
            if E is None:
                runs = (lambda: x @ w.T, lambda: backend.linear(x, W), lambda: tiles_blas(backend, x, W))
            else:
                runs = (lambda: NumpyBackend.expert_linear(backend, x, w, ids),
                        lambda: backend.expert_linear(x, W, ids), lambda: experts_blas(backend, x, W, ids))
            rates = [flops / best_time(f, repeat) / 1e9 for f in runs]
            print(f"{label:34s} {name:5s} {rates[0]:9.0f} {rates[1]:7.0f} {rates[2]:10.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--random-checkpoint", type=Path, help="write the realistic-width checkpoint here")
    parser.add_argument("--step", help="a model (HF directory or GGUF file) to time denoising steps of")
    parser.add_argument("--backend", default="ggml")
    parser.add_argument("options", nargs="*", help="backend options as key=value (integers)")
    args = parser.parse_args()
    if args.random_checkpoint:
        print(random_checkpoint(args.random_checkpoint))
    elif args.step:
        options = {k: int(v) for k, v in (o.split("=") for o in args.options)}
        ms = step_ms(args.step, args.backend, options, args.repeat)
        print(f"{args.step} {args.backend} {options}: {ms:.0f} ms per denoising step")
    else:
        products(args.threads, args.tokens, args.repeat)


if __name__ == "__main__":
    main()
