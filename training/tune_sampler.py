"""Choose a Sudoku checkpoint's released sampler settings on the validation set (dev-time tool).

    python training/tune_sampler.py --model runs/sudoku --puzzles 300 [--write]

Scores every combination of the temperature range (t_min, t_max) and the entropy bound in the
grids below on the first N validation puzzles (never the held-out test set), at the checkpoint's
maximum of denoising steps, and prints them best first: highest solve rate, then fewest steps.
`--write` stores the best in the checkpoint's generation_config.json (transformers' layout: t_min,
t_max and sampler_config.entropy_bound), leaving every other key as it was.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")    # one process per core; set before numpy loads

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portable_dg import sudoku  # noqa: E402

TEMPERATURES = [(0.4, 0.8), (0.6, 1.0), (0.8, 1.0), (0.8, 1.2), (0.9, 1.3), (1.0, 1.4)]
ENTROPY_BOUNDS = [0.1, 0.03]


def score(model_path: str, puzzles: int, t_min: float, t_max: float, entropy_bound: float) -> dict:
    """Solve rate, cells and mean steps of one setting on the validation puzzles (seed 0)."""
    import portable_dg

    model = portable_dg.load(model_path, backend="numpy")
    ev = sudoku.evaluate(model, sudoku.validation_set(puzzles), seed=0, t_min=t_min, t_max=t_max,
                         entropy_bound=entropy_bound)
    return dict(t_min=t_min, t_max=t_max, entropy_bound=entropy_bound, solve_rate=ev.solve_rate,
                cells_correct=ev.cells_correct, mean_steps=ev.mean_steps)


def write_best(model_path: Path, best: dict) -> None:
    """Store the setting in generation_config.json (atomically, other keys untouched)."""
    path = model_path / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(t_min=best["t_min"], t_max=best["t_max"])
    config.setdefault("sampler_config", {"_cls_name": "EntropyBoundSamplerConfig"})
    config["sampler_config"]["entropy_bound"] = best["entropy_bound"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=sudoku.default_model_path())
    parser.add_argument("--puzzles", type=int, default=300, help="first N puzzles of the validation set")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", action="store_true", help="store the best setting in the checkpoint")
    args = parser.parse_args(argv)
    grid = list(itertools.product(TEMPERATURES, ENTROPY_BOUNDS))
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [pool.submit(score, str(args.model), args.puzzles, t_min, t_max, bound)
                for (t_min, t_max), bound in grid]
        results = [job.result() for job in jobs]
    results.sort(key=lambda r: (-r["solve_rate"], r["mean_steps"]))
    for r in results:
        print(f"t {r['t_min']:.1f} -> {r['t_max']:.1f}  entropy bound {r['entropy_bound']:<5g} "
              f"solved {100 * r['solve_rate']:5.1f}%  cells {100 * r['cells_correct']:5.1f}%  "
              f"steps {r['mean_steps']:5.2f}")
    if args.write:
        write_best(args.model, results[0])
        print(f"wrote {args.model / 'generation_config.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
