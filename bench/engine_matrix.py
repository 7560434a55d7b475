"""The engine's measurements (issue 11): batches against one sequence after another, eager against
compiled steps, torch ops per layer, all in one reproducible run; writes bench/ENGINE.md.

    .venv/bin/python bench/engine_matrix.py --workdir /tmp/engine      # ~20-40 min on 2 cores

1. Sudoku: 16 held-out puzzles solved in one batch against one `generate` call after another
   (same seeds, so the same answers), numpy and torch (CPU).
2. `pdg bench --batch B` (fixed steps, early stop off) at B = 1, 4, 16 on the bundled model and at
   B = 1, 4 on `mini` (released width, 2 layers), numpy and torch; the sequential figure is the
   B = 1 run's canvas tok/s (B sequences one after another take B times as long).
3. torch eager against `torch.compile`d steps (ms/step, mini and the bundled model).
4. torch operators per decoder layer (profiler count over a steady denoising step / layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import portable_dg
from portable_dg import sudoku as sd
from portable_dg.bench import BenchSettings, bench_loaded

ROOT = Path(__file__).resolve().parent.parent


def sudoku_batch(backend: str, n: int = 16) -> dict:
    """Seconds for n puzzles one after another and in one batch; the answers must agree."""
    model = portable_dg.load(sd.default_model_path(), backend=backend)
    prompts = [sd.prompt_ids(p) for p, _ in sd.test_set(n)]
    portable_dg.generate(model, prompts[0], seed=0, max_new_tokens=sd.CELLS)            # warm-up
    start = time.perf_counter()
    singles = [portable_dg.generate(model, p, seed=i, max_new_tokens=sd.CELLS) for i, p in enumerate(prompts)]
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    batch = portable_dg.generate_batch(model, prompts, seed=list(range(n)), max_new_tokens=sd.CELLS)
    batched = time.perf_counter() - start
    same = all(np.array_equal(a.sequences, b.sequences) and a.steps == b.steps for a, b in zip(singles, batch))
    steps = [sum(o.steps) for o in batch]
    return {"backend": backend, "puzzles": n, "sequential_s": sequential, "batch_s": batched,
            "speedup": sequential / batched, "same_answers": same, "steps_mean": float(np.mean(steps)),
            "steps_max": max(steps)}


def bench_rows(path: Path, backend: str, batches: list[int], steps: int, new_tokens: int,
               options: dict | None = None, repeat: int = 2, warmup: int = 1) -> list[dict]:
    """canvas tok/s and ms/step of `pdg bench --batch B` for each B (median of `repeat` runs after
    `warmup` discarded ones)."""
    rows = []
    for batch in batches:
        settings = BenchSettings(prompt_len=64, new_tokens=new_tokens, steps=f"fixed:{steps}", repeat=repeat,
                                 warmup=warmup, batch=batch)
        report = bench_loaded(path, backend, None, settings, False, options or {}).to_dict()
        rows.append({"backend": backend + (" compiled" if (options or {}).get("compile") else ""),
                     "batch": batch, "canvas_tok_s": report["metrics"]["canvas_tok_s"]["median"],
                     "ms_per_step": report["metrics"]["ms_per_step"]["median"],
                     "peak_host_gib": report["memory"]["peak_host_bytes"] / 2**30})
    return rows


def ops_per_layer(path: Path) -> float:
    """torch operators recorded per decoder layer in one steady denoising step (CPU, eager)."""
    from torch.profiler import ProfilerActivity, profile

    from portable_dg.engine import Engine

    model = portable_dg.load(path, backend="torch")
    engine = Engine(model, max_batch=1)
    engine.submit(np.arange(5, 69), seed=0, max_new_tokens=model.canvas_length, max_denoising_steps=8,
                  stability_threshold=9)
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    top_level = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    return len(top_level) / model.config.num_hidden_layers


def markdown(results: dict) -> str:
    lines = ["# Engine measurements (issue 11)", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores usable, "
             f"load average {results['load'][0]:.1f} at the start and {results['load'][1]:.1f} at the end "
             f"(a shared machine); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
             f"Command: `{results['command']}`.", "",
             "## 16 Sudoku puzzles: one batch against one after another (same seeds, same answers)", "",
             "| backend | one after another (s) | one batch (s) | speedup | same answers | steps mean / max |",
             "|---|---|---|---|---|---|"]
    for r in results["sudoku"]:
        lines.append(f"| {r['backend']} | {r['sequential_s']:.2f} | {r['batch_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['same_answers']} | {r['steps_mean']:.1f} / {r['steps_max']} |")
    lines += ["", "## pdg bench --batch (fixed steps, early stop off)", "",
              "| model | backend | batch | canvas tok/s | vs batch 1 | ms/step | peak host GiB |",
              "|---|---|---|---|---|---|---|"]
    for model, rows in results["bench"].items():
        base = {r["backend"]: r["canvas_tok_s"] for r in rows if r["batch"] == 1}
        for r in rows:
            ratio = r["canvas_tok_s"] / base[r["backend"]] if r["backend"] in base else float("nan")
            lines.append(f"| {model} | {r['backend']} | {r['batch']} | {r['canvas_tok_s']:.1f} | {ratio:.2f}x | "
                         f"{r['ms_per_step']:.1f} | {r['peak_host_gib']:.2f} |")
    lines += ["", "## torch operators per decoder layer (one steady step, CPU, eager)", "",
              f"{results['ops_per_layer']:.0f} top-level aten operators per layer.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/portable_dg_engine"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    parser.add_argument("--mini-repeat", type=int, default=2,
                        help="measured runs on mini (each B = 4 run of 16 steps takes minutes on a CPU)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    mini = args.workdir / "mini"
    if not mini.exists():
        subprocess.run([sys.executable, "-m", "portable_dg.cli", "synth", str(mini), "--like", "mini"], check=True)
    from portable_dg.bench import machine

    results = {"machine": machine(), "load": [os.getloadavg()[0]],
               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "sudoku": [sudoku_batch(b) for b in ("numpy", "torch")], "bench": {}}
    bundled = sd.default_model_path()
    results["bench"]["bundled"] = sum((bench_rows(bundled, b, [1, 4, 16], args.steps, sd.CELLS) for b in
                                       ("numpy", "torch")), [])
    mini_runs = {"repeat": args.mini_repeat, "warmup": min(1, args.mini_repeat - 1)}
    results["bench"]["mini"] = sum((bench_rows(mini, b, [1, 4], args.steps, 256, **mini_runs)
                                    for b in ("numpy", "torch")), [])
    if args.compile:
        results["bench"]["bundled"] += bench_rows(bundled, "torch", [1, 16], args.steps, sd.CELLS, {"compile": True})
        results["bench"]["mini"] += bench_rows(mini, "torch", [1], args.steps, 256, {"compile": True}, **mini_runs)
    results["ops_per_layer"] = ops_per_layer(mini)
    results["load"].append(os.getloadavg()[0])
    (ROOT / "bench" / "ENGINE.md").write_text(markdown(results))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
