"""Speed of the ggml backend's products: GFLOP/s per shape, weight type and route, beside this
machine's float32 and int8 reference rates measured in the same run.

    python -m portable_dg.backends.ggml.bench [--threads N] [--tokens 256] [--repeat 5] [--json]
    python -m portable_dg.backends.ggml.bench --step MODEL [--backend ggml] [backend options as k=v]

Products (random weights, `tokens` rows of activations): the released model's dense projections,
its experts (`expert_linear`, 8 of 32 per token as in `pdg synth --like mini`), and the tied head
and soft embedding over a 32768-token vocabulary.  Routes:

    ggml          the stored blocks through `ggml_mul_mat` / `ggml_mul_mat_id` (the soft embedding:
                  float32 tiles in a ggml graph)
    ggml repacked the interleaved layout ggml's CPU backend repacks this type into (when it has one)
    tiles+BLAS    rows dequantized tile by tile with ggml's `to_float`, multiplied by numpy's BLAS

References on the dense and head shapes: numpy float32 (BLAS), torch float32 and torch's dynamically
quantized int8 linear (fbgemm: its int8 GEMM, the int8 rate of this CPU), when torch is installed.
The best of `repeat` runs is kept, to damp noise from other processes.  `--step` times the best of
`repeat` self-conditioned denoising steps of one canvas after a 64-token prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np

# (label, experts (E, k) or None, out, in): dense, expert and vocabulary-side products
SHAPES = [("q/gate 2816->2112", None, 2112, 2816), ("down 2112->2816", None, 2816, 2112),
          ("experts gate_up 2816->1408 (8 of 32)", (32, 8), 1408, 2816),
          ("experts down 704->2816 (8 of 32)", (32, 8), 2816, 704),
          ("head 2816->32768", None, 32768, 2816), ("soft embedding 32768->2816", "soft", 32768, 2816)]
TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"]
ROUTES = ["ggml", "ggml repacked", "tiles+BLAS"]
REFERENCES = ["numpy f32", "torch f32", "torch int8 (fbgemm)"]


def best_time(f: Callable[[], object], repeat: int) -> float:
    """Seconds of the fastest of `repeat` calls (after one warm-up call)."""
    f()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def graph_soft_embedding(backend: Any, logits: np.ndarray, w: Any) -> Callable[[], np.ndarray]:
    """The soft embedding as the step's graphs run it (a ggml graph of float32 tiles), replayed."""
    from .graph_ops import GraphOps
    from .trace import Trace

    ops = GraphOps(backend)
    ops.trace = Trace(backend.engine, ops)
    blas_min = backend.blas_min_tokens

    def run() -> np.ndarray:
        backend.blas_min_tokens = 10 ** 9           # keep the product in the graph
        recording = not ops.trace.tape
        ops.trace.start(0)
        try:
            out = np.asarray(ops.soft_embedding(logits, w))
        finally:
            backend.blas_min_tokens = blas_min
        if recording:
            ops.trace.plan()                        # as GraphStep does: replays run on the planned graph
        return out
    return run


def route_runs(backend: Any, x: np.ndarray, w: Any, experts: Any) -> dict[str, Callable[[], np.ndarray]]:
    """The routes' callables for one placed weight."""
    from . import GgmlBackend

    ggml_only = 10 ** 9
    if isinstance(experts, str):
        return {"tiles+BLAS": lambda: GgmlBackend.soft_embedding(backend, x, w),
                "ggml": graph_soft_embedding(backend, x, w)}
    ids = experts

    def product(blas_min: int) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            saved, backend.blas_min_tokens = backend.blas_min_tokens, blas_min
            try:
                return backend.linear(x, w) if ids is None else backend.expert_linear(x, w, ids)
            finally:
                backend.blas_min_tokens = saved
        return run
    runs = {"ggml repacked" if w.repacked else "ggml": product(ggml_only)}
    if not w.repacked and backend.engine.is_cpu:
        runs["tiles+BLAS"] = lambda: forced_blas(backend, x, w, ids)
    return runs


def forced_blas(backend: Any, x: np.ndarray, w: Any, ids: np.ndarray | None) -> np.ndarray:
    """The product as dequantized tiles through numpy's BLAS, whatever the backend's route."""
    from . import tiles

    if ids is None:
        return np.concatenate([x @ backend.float_rows(w, a, b).T for a, b in tiles(w, w.shape[0])], axis=1)
    T, k = ids.shape
    out = w.shape[1]
    y = np.empty((T, k, out), np.float32)
    for e in np.unique(ids):                               # one GEMM per expert
        t, j = np.nonzero(ids == e)
        y[t, j] = x[t] @ backend.float_rows(w, int(e) * out, (int(e) + 1) * out).T
    return y


def reference_runs(x: np.ndarray, w: np.ndarray) -> dict[str, Callable[[], Any]]:
    """float32 and int8 references for a dense product x @ w.T."""
    runs: dict[str, Callable[[], Any]] = {"numpy f32": lambda: x @ w.T}
    try:
        import torch
    except ImportError:
        return runs
    xt, lin = torch.from_numpy(x), torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    runs["torch f32"] = lambda: torch.inference_mode()(lin)(xt)
    runs["torch int8 (fbgemm)"] = lambda: torch.inference_mode()(int8)(xt)
    return runs


def products(threads: int | None, T: int, repeat: int, shapes: list = SHAPES, types: list = TYPES) -> list[dict]:
    """Rows {"shape", "type", "route", "gflops"} for every shape x type x route, plus the reference
    rows (type "-") of the dense shapes."""
    import warnings

    import ggml

    from . import create
    from .engine import quantize

    plain = create(n_threads=threads, device="cpu", repack=False)
    packed = create(n_threads=threads, device="cpu")
    if threads is not None:
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
    rng = np.random.default_rng(0)
    rows = []
    for label, experts, out, n in shapes:
        soft = experts == "soft"
        shape = (out, n) if experts is None or soft else (experts[0], out, n)
        w = (rng.standard_normal(shape) * n ** -0.5).astype(np.float32)
        x = rng.standard_normal((T, out if soft else n)).astype(np.float32)
        ids = None if experts is None or soft else np.stack([rng.permutation(experts[0])[:experts[1]]
                                                             for _ in range(T)])
        flops = 2 * T * out * n * (1 if experts is None or soft else experts[1])
        if experts is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                  # torch's deprecation of its eager quantization
                for ref, run in reference_runs(x, w).items():
                    rate = flops / best_time(run, repeat) / 1e9
                    rows.append({"shape": label, "type": "-", "route": ref, "gflops": rate})
        for name in types:
            qtype = getattr(ggml, f"GGML_TYPE_{name}")
            if n % ggml.ggml_blck_size(qtype):
                continue                                          # llama.cpp falls back to another type here
            host = w if name == "F32" else (w.astype(np.float16) if name == "F16" else quantize(w, qtype))
            for backend in (plain, packed):
                W = backend.engine.weight(host.reshape(*shape[:-1], -1) if name not in ("F32", "F16") else host,
                                          qtype, shape, label, repack=backend is packed and not soft)
                if backend is packed and not W.repacked:
                    continue
                for route, run in route_runs(backend, x, W, "soft" if soft else ids).items():
                    rows.append({"shape": label, "type": name, "route": route,
                                 "gflops": flops / best_time(run, repeat) / 1e9})
            print(f"{label} {name}: " + ", ".join(f"{r['route']} {r['gflops']:.0f}" for r in rows
                                                  if r["shape"] == label and r["type"] == name), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table: one line per shape and type, one column per route."""
    columns = ROUTES + REFERENCES
    lines = ["| product | type | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    seen: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        seen.setdefault((r["shape"], r["type"]), {})[r["route"]] = r["gflops"]
    for (shape, qtype), rates in seen.items():
        cells = [f"{rates[c]:.0f}" if c in rates else "" for c in columns]
        lines.append(f"| {shape} | {qtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (last line)")
    parser.add_argument("--step", help="a model (HF directory or GGUF file) to time denoising steps of")
    parser.add_argument("--backend", default="ggml")
    parser.add_argument("options", nargs="*", help="backend options as key=value (integers)")
    args = parser.parse_args()
    if args.step:
        options = {k: int(v) for k, v in (o.split("=") for o in args.options)}
        ms = step_ms(args.step, args.backend, options, args.repeat)
        print(f"{args.step} {args.backend} {options}: {ms:.0f} ms per denoising step")
        return
    rows = products(args.threads, args.tokens, args.repeat)
    print(json.dumps(rows) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
