"""What a constraint costs and changes on a real model: the bundled Sudoku model under a regular
expression that fixes each puzzle's givens and allows only digits elsewhere; writes
bench/CONSTRAINTS.md.

    .venv/bin/python bench/constraints_sudoku.py [--puzzles 200] [--backends numpy,torch]

Each puzzle is solved alone (batch 1, seed = its index, the checkpoint's released sampler
settings), so a step's wall time is the network, the sampler and, when constrained, the walk over
the canvas (llguidance on the host) with its masked choices.  Three variants on the same puzzles
and seeds: no constraint; the regex with re-noised positions keeping the trained full-vocabulary
noise (the default); the regex with `constrain_noise=True` (noise drawn from allowed tokens).
Reported per variant: solve rate, answers that break a given, mean steps per canvas (the extra
steps a constraint costs), ms per step and the overhead per step against no constraint.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import portable_dg
from portable_dg import sudoku as sd
from portable_dg.bench import machine

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"none": {}, "regex": {"constrain": True}, "regex, constrain_noise": {"constrain": True,
                                                                                  "constrain_noise": True}}


def run_variant(model, pairs, constrain: bool = False, constrain_noise: bool = False) -> dict:
    """Solve each puzzle alone; time, steps, solve rate and broken givens."""
    answers, steps, seconds = [], [], 0.0
    for i, (puzzle, _) in enumerate(pairs):
        options = {"regex": sd.givens_regex(puzzle), "constrain_noise": constrain_noise} if constrain else {}
        start = time.perf_counter()
        out = portable_dg.generate(model, sd.prompt_ids(puzzle), seed=i, max_new_tokens=sd.CELLS, **options)
        seconds += time.perf_counter() - start
        answers.append(sd.grid_from_ids(out.sequences[0, out.prompt_length:]))
        steps.append(sum(out.steps))
    result = sd.score(pairs, answers, steps)
    broken = sum(bool(((p > 0) & (a != p)).any()) for (p, _), a in zip(pairs, answers))
    return {"solved": result.solve_rate, "broken_givens": broken, "mean_steps": result.mean_steps,
            "ms_per_step": 1000 * seconds / sum(steps)}


def markdown(rows: list[dict], puzzles: int) -> str:
    cpu = machine()
    lines = ["# Constraints on the bundled Sudoku model", "",
             f"Written by `bench/constraints_sudoku.py` on {time.strftime('%Y-%m-%d')}; {cpu['cpu']}, "
             f"{cpu['cores']} cores, load average {os.getloadavg()[0]:.1f} at the end.", "",
             f"The first {puzzles} held-out test puzzles, one at a time (batch 1), seed = puzzle index, "
             "the checkpoint's released sampler settings.  Regex: the puzzle's givens as themselves, "
             "[1-9] at every blank.  Overhead: ms/step against the same backend without a constraint "
             "(the machine is shared: a few percent is noise); ms/step is a puzzle's wall time, prompt "
             "encode included, over its steps.", "",
             "| backend | constraint | solved | answers breaking a given | mean steps | extra steps | ms/step | "
             "overhead/step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["backend"] == r["backend"] and b["variant"] == "none")
        lines.append(f"| {r['backend']} | {r['variant']} | {100 * r['solved']:.1f}% | {r['broken_givens']} | "
                     f"{r['mean_steps']:.2f} | {r['mean_steps'] - base['mean_steps']:+.2f} | "
                     f"{r['ms_per_step']:.1f} | {r['ms_per_step'] - base['ms_per_step']:+.1f} ms |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puzzles", type=int, default=200)
    parser.add_argument("--backends", default="numpy,torch")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "CONSTRAINTS.md")
    args = parser.parse_args()
    pairs = sd.test_set(args.puzzles)
    rows = []
    for backend in args.backends.split(","):
        model = portable_dg.load(sd.default_model_path(), backend=backend)
        run_variant(model, pairs[:2])                                        # warm-up
        for name, options in VARIANTS.items():
            rows.append({"backend": backend, "variant": name, **run_variant(model, pairs, **options)})
            print(rows[-1], flush=True)
    args.out.write_text(markdown(rows, args.puzzles))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
