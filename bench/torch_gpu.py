"""The torch backend on a GPU: bf16 and FP8 against transformers' own implementation.

    .venv/bin/python bench/torch_gpu.py --workdir /tmp/dg --layers 6,12      # on the GPU machine
    .venv/bin/python bench/torch_gpu.py --tiny                               # smoke run on CPU

Settings of the vLLM H100 benchmark: batch 1, a 4096-token prompt, 512 new tokens, 16 fixed
denoising steps per canvas with early stop off; --batch also runs more sequences at once.  Timing
is `portable_dg.bench.timed_generation`: the engine's whole steps (decoder pass, sampling,
acceptance, stop), captured in CUDA graphs unless --no-graphs.
Weights are random (`portable_dg.synth`) at the released model's shapes; a full 30-layer bf16 file
(~50 GB) plus its FP8 copy does not fit a 64 GB disk, so --layers takes one or more layer counts
and, given two or more, fits time = a + b * layers and extrapolates to 30 (labelled as such).

Reported per variant: canvas tok/s (batch x 256 x canvases / denoising time), visible tok/s,
time to first canvas, prefill tok/s, ms per step and peak GPU memory.  With --check the script
first verifies, on the device, that the CUDA-graph steps give the eager steps' output and that the
FP8 kernels agree with the emulation.  (Written without a GPU to run it on: untested on a GPU.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import portable_dg
from portable_dg.bench import BenchSettings, canvases_for, run_metrics, timed_generation
from portable_dg.converters.torch_fp8 import convert_fp8
from portable_dg.synth import write_synthetic

NO_EARLY_STOP = 1e-30   # confidence threshold: mean entropy never falls below it (transformers side)


def checkpoints(workdir: Path, like: str, layers: int) -> dict[str, Path]:
    """bf16 and FP8 random checkpoints with `layers` layers, written once into workdir."""
    bf16 = workdir / f"{like}-{layers}L-bf16"
    fp8 = workdir / f"{like}-{layers}L-fp8"
    if not bf16.exists():
        write_synthetic(bf16, like, layers=layers, dtype="bf16", progress=True)
    if not fp8.exists():
        convert_fp8(bf16, fp8)
    return {"bf16": bf16, "fp8": fp8}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(path: Path, device: str, dtype: str, graphs: bool, prompt: np.ndarray, new: int, steps: int,
             batch: int) -> dict:
    """One fixed-step generation of `batch` sequences on the torch backend -> measurements."""
    model = portable_dg.load(path, backend="torch", device=device, dtype=dtype, graphs=graphs,
                             max_context=len(prompt) + new)
    L = model.canvas_length
    warm = BenchSettings(prompt_len=64, new_tokens=L, steps=f"fixed:{steps}", batch=batch)
    timed_generation(model, prompt[:64], warm, 1, seed=1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    settings = BenchSettings(prompt_len=len(prompt), new_tokens=new, steps=f"fixed:{steps}", batch=batch)
    run = timed_generation(model, prompt, settings, canvases_for(new, L), seed=0)
    metrics = run_metrics(run, len(prompt), new, L, batch)
    metrics["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return metrics


def run_transformers(path: Path, device: str, prompt: np.ndarray, new: int, steps: int) -> dict:
    """The same generation with transformers' DiffusionGemmaForBlockDiffusion (bf16, its defaults)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.bfloat16).to(device).eval()
    settings = dict(max_new_tokens=new, max_denoising_steps=steps, confidence_threshold=NO_EARLY_STOP)
    ids = torch.from_numpy(prompt[None]).to(device)
    with torch.no_grad():
        model.generate(ids[:, :64], **{**settings, "max_new_tokens": model.config.canvas_length})
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        model.generate(ids, **settings)
        sync(device)
        wall = time.perf_counter() - start
    canvases = -(-new // model.config.canvas_length)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"canvases": canvases, "visible_tok_s": model.config.canvas_length * canvases / wall,
            "wall_s": wall, "peak_gib": peak}


def check(paths: dict[str, Path], device: str, prompt: np.ndarray) -> None:
    """On the device: graphed steps == eager steps; FP8 kernels vs emulation (KL of the logits)."""
    outputs = []
    for graphs in (False, True):
        model = portable_dg.load(paths["bf16"], backend="torch", device=device, dtype="bfloat16", graphs=graphs)
        outputs.append(portable_dg.generate_batch(model, [prompt[:256], prompt[:300]], seed=[0, 1],
                                                  max_new_tokens=2 * model.canvas_length, max_denoising_steps=8))
    same = all(np.array_equal(a.sequences, b.sequences) and a.steps == b.steps for a, b in zip(*outputs))
    print(f"graphed generation == eager generation: {same}")
    native = portable_dg.load(paths["fp8"], backend="torch", device=device, dtype="bfloat16")
    emulated = portable_dg.load(paths["fp8"], backend="torch", device=device, dtype="bfloat16")
    emulated.backend.fp8_native = emulated.backend.fp8_grouped_native = False
    canvas = (7 * np.arange(native.canvas_length) + 3) % native.config.vocab_size
    a, b = native.start(prompt).denoise(canvas), emulated.start(prompt).denoise(canvas)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = float((np.exp(lb) * (lb - la)).sum(-1).mean())
    print(f"fp8 native={native.backend.fp8_native}/{native.backend.fp8_grouped_native} vs emulation: "
          f"mean KL {kl:.2e}, top-1 {float((a.argmax(-1) == b.argmax(-1)).mean()):.3f}")


def extrapolate(per_layers: dict[int, dict], key: str, target: int = 30) -> float | None:
    """Fit time-per-token = a + b * layers over the measured layer counts; the rate at `target` layers."""
    if len(per_layers) < 2:
        return None
    layers = np.array(sorted(per_layers), dtype=np.float64)
    seconds = np.array([1.0 / per_layers[n][key] for n in sorted(per_layers)])
    b, a = np.polyfit(layers, seconds, 1)
    predicted = a + b * target
    return 1.0 / predicted if predicted > 0 else None      # noisy timings can fit a negative slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/portable_dg_bench"))
    parser.add_argument("--layers", default="6,12", help="layer counts, comma-separated (released shapes)")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", default="1,4", help="batch sizes, comma-separated")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default="bf16,fp8")
    parser.add_argument("--no-graphs", action="store_true", help="eager steps only")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--check", action="store_true", help="verify graphs and FP8 kernels first")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny preset, short prompt")
    args = parser.parse_args()
    like = "released"
    if args.tiny:
        like, args.device, args.prompt, args.new, args.steps = "tiny", "cpu", 48, 32, 4
        args.layers = args.layers if args.layers != "6,12" else "2,3"
    graphs = args.device.startswith("cuda") and not args.no_graphs
    rng = np.random.default_rng(0)
    results: dict[str, dict[int, dict]] = {}
    for layers in [int(n) for n in args.layers.split(",")]:
        paths = checkpoints(args.workdir, like, layers)
        V = portable_dg.source.open_source(paths["bf16"]).config.vocab_size
        prompt = rng.integers(5, V, size=args.prompt).astype(np.int64)
        if args.check:
            check(paths, args.device, prompt)
        for precision in args.precisions.split(","):
            dtype = "float32" if args.device == "cpu" and precision == "fp8" else "bfloat16"
            for batch in [int(b) for b in args.batch.split(",")]:
                results.setdefault(f"{precision}-b{batch}", {})[layers] = run_ours(
                    paths[precision], args.device, dtype, graphs, prompt, args.new, args.steps, batch)
        if not args.skip_transformers:
            results.setdefault("transformers-bf16", {})[layers] = run_transformers(
                paths["bf16"], args.device, prompt, args.new, args.steps)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    reference = results.get("transformers-bf16", {})
    for precision, runs in results.items():
        for layers, run in runs.items():
            if layers in reference and precision != "transformers-bf16":
                run["visible_speedup_vs_transformers"] = run["visible_tok_s"] / reference[layers]["visible_tok_s"]
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "settings": vars(args) | {"workdir": str(args.workdir), "graphs": graphs}, "results": results,
              "extrapolated_30_layers": {p: {k: extrapolate(r, k) for k in ("canvas_tok_s", "visible_tok_s")
                                              if all(k in m for m in r.values())}
                                          for p, r in results.items()}}
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
