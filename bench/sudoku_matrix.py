"""Solve rate of a Sudoku checkpoint on every backend and quantization; writes bench/SUDOKU.md.

    .venv/bin/python bench/sudoku_matrix.py [--model DIR] [--puzzles 1000] [--mlx-puzzles 100] [--workdir DIR]

Every variant solves the same first N puzzles of the held-out test set with the checkpoint's own
generation config (its released sampler settings) and the same seed, so rows differ only by
backend and weights.  Quantized files are written with `pdg convert` into --workdir once and
reused.  Backends that are not installed here are skipped and said so.  The mlx backend solves
fewer puzzles (mlx[cpu] on Linux is slow) and is compared with fp32 on the same ones.  Variants
run in parallel, one process per core with one thread each.  Also: the transformers
reference against our numpy backend under the deterministic stand-ins (fixed noise, argmax
sampling), which must agree answer for answer, and the fp32 model on medium and hard puzzles.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")    # one process per core; set before numpy loads

import argparse  # noqa: E402
import subprocess  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from portable_dg import load  # noqa: E402
from portable_dg import sudoku as sd  # noqa: E402
from portable_dg.backends import available  # noqa: E402
from sudoku_reference import pattern_noise, reference_evaluate  # noqa: E402  (bench/, beside this file)

HERE = Path(__file__).resolve().parent
PDG = [sys.executable, "-m", "portable_dg.cli"]
# (weights label, backend, (`pdg convert --to`, --quant) or None for the checkpoint as is)
VARIANTS = [
    ("fp32", "numpy", None),
    ("fp32", "torch", None),
    ("GGUF F32", "ggml", ("gguf", "F32")),
    ("GGUF Q8_0", "ggml", ("gguf", "Q8_0")),
    ("GGUF Q4_K_M", "ggml", ("gguf", "Q4_K_M")),
    ("MLX q8", "numpy", ("mlx", "q8")),
    ("MLX q4", "numpy", ("mlx", "q4")),
    ("MLX q8", "mlx", ("mlx", "q8")),
    ("MLX q4", "mlx", ("mlx", "q4")),
]
# the targets of issue 7: points of solve rate a quantization may lose against fp32
TOLERANCE = {"Q8_0": 1.0, "q8": 1.0, "Q4_K_M": 5.0, "q4": 5.0}


def converted(source: Path, workdir: Path, target: str, quant: str) -> Path:
    """`pdg convert` of source to (target, quant) in workdir, written once."""
    path = workdir / f"{source.name}-{quant}{'.gguf' if target == 'gguf' else ''}"
    if not path.exists():
        done = subprocess.run(PDG + ["convert", str(source), str(path), "--to", target, "--quant", quant],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pdg convert --to {target} --quant {quant} failed: {done.stderr.strip()[-400:]}")
    return path


def timed_evaluation(path: Path, backend: str, puzzles: int, difficulty: str,
                     seed: int) -> tuple[sd.Evaluation, float]:
    """(scores, seconds) of the model at path on backend, over the first test puzzles."""
    if backend == "torch":
        import torch
        torch.set_num_threads(1)
    model = load(path, backend=backend)
    start = time.perf_counter()
    result = sd.evaluate(model, sd.test_set(puzzles, difficulty), seed=seed)
    return result, time.perf_counter() - start


def row(weights: str, backend: str, ev: sd.Evaluation, seconds: float, fp32: sd.Evaluation | None) -> str:
    """One markdown table row; the last column is the change in solve rate against fp32 numpy."""
    delta = ""
    if fp32 is not None:
        points = 100 * (ev.solve_rate - fp32.solve_rate)
        delta = f"{points:+.1f}"
        bound = TOLERANCE.get(weights.split()[-1])
        if bound is not None:
            delta += f" ({'within' if abs(points) <= bound else 'outside'} {bound:g})"
    return (f"| {weights} | {backend} | {ev.puzzles} | {100 * ev.solve_rate:.1f}% | {100 * ev.cells_correct:.1f}% | "
            f"{ev.mean_steps:.2f} | {delta} | {1000 * seconds / ev.puzzles:.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=sd.default_model_path())
    parser.add_argument("--puzzles", type=int, default=1000, help="first N puzzles of the test set")
    parser.add_argument("--mlx-puzzles", type=int, default=100, help="the first N of them on the mlx backend")
    parser.add_argument("--harder-puzzles", type=int, default=200, help="medium and hard puzzles each")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compare-puzzles", type=int, default=200,
                        help="puzzles for the transformers comparison (it is slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where converted files go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=HERE / "SUDOKU.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        lines = run(args, workdir)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def run(args: argparse.Namespace, workdir: Path) -> list[str]:
    """Every measurement -> the lines of SUDOKU.md."""
    gen = load(args.model, backend="numpy").generation_config
    lines = [
        "# Sudoku: the bundled model on every backend and quantization", "",
        f"Written by `bench/sudoku_matrix.py` on {datetime.now(timezone.utc):%Y-%m-%d}.  Reproduce: "
        f"`{' '.join(['.venv/bin/python', 'bench/sudoku_matrix.py', *sys.argv[1:]])}`.", "",
        f"The first {args.puzzles} puzzles of the held-out test set (easy: 40-50 givens), seed "
        f"{args.seed}, the checkpoint's released sampler settings: at most {gen.max_denoising_steps} "
        f"steps, entropy bound {gen.entropy_bound:g}, temperature {gen.t_max:g} -> {gen.t_min:g}, "
        f"stop when stable for {gen.stability_threshold} step(s) and mean entropy < "
        f"{gen.confidence_threshold:g}.  The last column is wall time per puzzle on this machine, "
        f"{args.workers} process(es) at a time, one thread each.", "",
        "| weights | backend | puzzles | solved | blank cells right | mean steps | vs fp32 (points) | ms/puzzle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp32 = VARIANTS[0][:2]
    installed = {backend: available(backend) for _, backend, _ in VARIANTS}
    table, extra = [], []           # (weights, backend, path, puzzles, difficulty)
    for weights, backend, conversion in VARIANTS:
        if not installed[backend]:
            print(f"skip {weights} on {backend}: backend not installed", file=sys.stderr)
            continue
        path = args.model if conversion is None else converted(args.model, workdir, *conversion)
        table.append((weights, backend, path, args.mlx_puzzles if backend == "mlx" else args.puzzles, "easy"))
    if any(job[3] != args.puzzles for job in table):          # fp32 on the mlx rows' puzzles too
        extra.append((*fp32, args.model, args.mlx_puzzles, "easy"))
    extra += [(*fp32, args.model, args.harder_puzzles, name) for name in ("medium", "hard")]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(timed_evaluation, path, backend, n, difficulty, args.seed)
                   for _, backend, path, n, difficulty in table + extra]
        results = dict(zip(table + extra, (f.result() for f in futures)))
    reference = {job[3]: results[job][0] for job in table + extra if job[:2] == fp32 and job[4] == "easy"}
    for job in table:
        (ev, seconds), (weights, backend) = results[job], job[:2]
        print(f"{weights} on {backend}: {ev.summary()}", file=sys.stderr, flush=True)
        lines.append(row(weights, backend, ev, seconds, None if job[:2] == fp32 else reference[ev.puzzles]))
    lines += [f"| {weights} | {backend} | not installed here | | | | | |"
              for weights, backend, _ in VARIANTS if not installed[backend]]
    lines += ["", "## Harder puzzles (fp32, numpy; the model was trained on easy ones only)", "",
              "| difficulty | givens | puzzles | solved | blank cells right | mean steps |",
              "|---|---|---|---|---|---|"]
    for job in [table[0]] + extra[-2:]:
        ev, difficulty = results[job][0], job[4]
        low, high = sd.DIFFICULTY[difficulty]
        lines.append(f"| {difficulty} | {low}-{high} | {ev.puzzles} | {100 * ev.solve_rate:.1f}% | "
                     f"{100 * ev.cells_correct:.1f}% | {ev.mean_steps:.2f} |")
    return [*lines, "", *compare_section(args, installed["torch"])]


def compare_section(args: argparse.Namespace, have_torch: bool) -> list[str]:
    """transformers 5.23.0 against numpy, both deterministic, on the same puzzles."""
    if not have_torch:
        return ["## transformers reference", "", "Not run: torch is not installed here."]
    pairs = sd.test_set(args.compare_puzzles)
    model = load(args.model, backend="numpy")
    ours = sd.evaluate(model, pairs, noise=pattern_noise(model.config.vocab_size), greedy=True)
    ref = reference_evaluate(args.model, pairs)
    agree = sum(a == b for a, b in zip(ours.answers, ref.answers))
    print(f"transformers: {ref.summary()}; identical answers {agree}/{len(pairs)}", file=sys.stderr)
    return ["## transformers reference (deterministic stand-ins)", "",
            f"Fixed canvas noise and argmax sampling on both sides, first {len(pairs)} test puzzles.", "",
            "| implementation | solved | blank cells right | mean steps |", "|---|---|---|---|",
            scores_row("portable_dg numpy", ours), scores_row("transformers 5.23.0", ref),
            "", f"Identical answers: **{agree}/{len(pairs)}**."]


def scores_row(name: str, ev: sd.Evaluation) -> str:
    """| name | solved | blank cells right | mean steps |"""
    return f"| {name} | {100 * ev.solve_rate:.1f}% | {100 * ev.cells_correct:.1f}% | {ev.mean_steps:.2f} |"


if __name__ == "__main__":
    main()
