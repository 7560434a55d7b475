"""`pdg sudoku`: solve a Sudoku with the bundled model (or any Sudoku checkpoint), or score a model.

stdout gets the answer as one line of 81 digits (0 where the canvas holds no digit); the puzzle, the
board and the verdict go to stderr.  The exit status is 1 when the answer breaks a Sudoku rule or a
given.  (The comparison with transformers is `bench/sudoku_matrix.py`: it patches transformers,
which the runtime never does.)
"""

from __future__ import annotations

import sys

import click

from ..errors import ConfigError

MAX_EVAL = 10_000     # puzzles are generated on the fly: 10k easy ones take about 2 minutes to make


def board(grid) -> str:
    """A 9x9 grid as text with box separators; blanks as '.'."""
    rows = []
    for r in range(9):
        cells = ["." if int(d) == 0 else str(int(d)) for d in grid[9 * r:9 * r + 9]]
        rows.append(" | ".join(" ".join(cells[c:c + 3]) for c in (0, 3, 6)))
        if r in (2, 5):
            rows.append("------+-------+------")
    return "\n".join(rows)


def draft_printer(stream=None):
    """An on_step callback printing each draft canvas as 81 characters ('.' = not a digit)."""
    from ..sudoku import grid_from_ids, grid_text

    stream = stream or sys.stderr

    def show(info) -> None:
        line = grid_text(grid_from_ids(info.draft)).replace("0", ".")
        stream.write(f"step {info.step:2d} T={info.temperature:.3f} accepted {info.accepted:2d} "
                     f"H={info.mean_entropy:.3f} {line}\n")
        stream.flush()

    return show


@click.command()
@click.argument("puzzle", required=False)
@click.option("--model", "model_path", default=None, help="Sudoku checkpoint (default: the bundled model).")
@click.option("--backend", default="numpy", show_default=True, help="numpy, ggml, mlx or torch.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the sampler, and of the generated puzzle when none is given.")
@click.option("--difficulty", type=click.Choice(["easy", "medium", "hard"]), default="easy",
              show_default=True, help="Givens of generated puzzles: easy 40-50, medium 32-39, hard 26-31.")
@click.option("--steps", type=int, default=None, help="Maximum denoising steps (default: the model's, 48).")
@click.option("--show-drafts", is_flag=True, help="Print the canvas after every denoising step.")
@click.option("--eval", "eval_n", type=int, default=None,
              help=f"Score the model on the first N puzzles (at most {MAX_EVAL:,}) of the held-out test set instead.")
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True,
              help="With --eval: the held-out test set, or the validation set sampler settings are tuned on.")
def sudoku(puzzle, model_path, backend, seed, difficulty, steps, show_drafts, eval_n, split):
    """Solve PUZZLE (81 characters, 1-9 and 0 or . for blanks; default: a generated one)."""
    import portable_dg
    from .. import sudoku as sd

    if eval_n is not None and puzzle is not None:
        raise ConfigError("give a PUZZLE or --eval N, not both")
    path = model_path or sd.default_model_path()
    model = portable_dg.load(path, backend=backend)
    if eval_n is not None:
        run_eval(model, eval_n, split, difficulty, seed, steps)
        return
    if puzzle is None:
        puzzle = sd.grid_text(sd.puzzles(seed, 1, difficulty)[0][0])
    grid = sd.parse_puzzle(puzzle)
    click.echo(f"puzzle:\n{board(grid)}", err=True)
    result = sd.solve(model, grid, seed=seed, max_denoising_steps=steps,
                      on_step=draft_printer() if show_drafts else None)
    click.echo(result.line)
    click.echo(f"answer ({result.steps} denoising steps):\n{board(result.grid)}", err=True)
    if result.solved:
        click.echo("solved: every row, column and box holds 1-9 and every given is kept", err=True)
        return
    shown = "; ".join(result.problems[:4])
    more = f"; and {len(result.problems) - 4} more" if len(result.problems) > 4 else ""
    click.echo(f"not solved: {shown}{more}", err=True)
    sys.exit(1)


def run_eval(model, n: int, split: str, difficulty: str, seed: int, steps: int | None) -> None:
    """Print the scores on the first n puzzles of a split ("test" or "validation").  Progress
    (puzzles made, puzzles solved) goes to stderr."""
    from .. import sudoku as sd
    from ..progress import Progress

    if not 0 < n <= MAX_EVAL:
        raise ConfigError(f"--eval takes 1 to {MAX_EVAL} puzzles, got {n}")
    with Progress(n, f"making {split} puzzles", "puzzle") as bar:
        pairs = []
        for pair in sd.iter_puzzles(sd.SPLIT_SEEDS[split], n, difficulty):
            pairs.append(pair)
            bar.update(1)
    givens = [int((p > 0).sum()) for p, _ in pairs]
    click.echo(f"{split} set: {n} {difficulty} puzzles, {min(givens)}-{max(givens)} givens "
               f"(mean {sum(givens) / n:.1f})", err=True)
    with Progress(n, "solving", "puzzle") as bar:
        ours = sd.evaluate(model, pairs, seed=seed, max_denoising_steps=steps, progress=bar.update)
    click.echo(f"portable_dg ({model.backend.name}, seed {seed}): {ours.summary()}")
