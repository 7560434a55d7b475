"""Sudoku: the task of the bundled default model.

A puzzle is 81 characters read row by row, digits 1-9 with `0` or `.` for a blank.  The model sees
a chat-free prompt, `<bos>` + the 81 cells + `<sep>`, and writes the 81-digit solution on its one
canvas of 81 tokens.  Token ids are fixed (the bundled tokenizer.json agrees with them):

    0 <pad>   1 <eos>   2 <bos>   3 <sep>   4 "0" (blank)   5..13 "1".."9"

The generator is seeded: a random solved grid by randomised backtracking, then cells removed in a
random order while the puzzle keeps exactly one solution, down to the requested number of givens
(more givens = easier).  `test_set` is the held-out set and `validation_set` the set the sampler
settings are tuned on, each fixed by its own seed; training never uses either seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import ConfigError

PAD, EOS, BOS, SEP, BLANK = 0, 1, 2, 3, 4
DIGIT_OFFSET = 4                       # id of digit d (0 = blank) is d + 4
VOCAB = ["<pad>", "<eos>", "<bos>", "<sep>"] + [str(d) for d in range(10)]
PROMPT_LENGTH = 83                     # <bos> + 81 cells + <sep>
CELLS = 81

# givens per puzzle (inclusive ranges); fewer givens = harder
DIFFICULTY = {"easy": (40, 50), "medium": (32, 39), "hard": (26, 31)}
TEST_SEED = 20_240_607
VALIDATION_SEED = 20_240_608

_UNITS = ([[9 * r + c for c in range(9)] for r in range(9)]
          + [[9 * r + c for r in range(9)] for c in range(9)]
          + [[9 * (3 * br + r) + 3 * bc + c for r in range(3) for c in range(3)]
             for br in range(3) for bc in range(3)])
_PEERS = [sorted({p for u in _UNITS if i in u for p in u} - {i}) for i in range(CELLS)]
_ALL = 0x3FE                           # bits 1..9


def default_model_path() -> Path:
    """The bundled Sudoku checkpoint directory (the default --model of `pdg generate`)."""
    return Path(__file__).parent / "assets" / "sudoku"


# ---------------------------------------------------------------------------------------- grids

def parse_puzzle(text: str) -> np.ndarray:
    """81 characters (digits, `0` or `.` for blank; whitespace ignored) -> int8 grid [81], 0 = blank."""
    chars = "".join(str(text).split())
    if len(chars) != CELLS or any(ch not in "0123456789." for ch in chars):
        raise ConfigError(f"a puzzle is 81 characters of 1-9 with 0 or . for blanks, got "
                          f"{len(chars)} characters: {chars[:90]!r}")
    return np.array([0 if ch == "." else int(ch) for ch in chars], np.int8)


def check_givens(grid: Sequence[int]) -> None:
    """ConfigError if the givens of a puzzle already break a rule (a repeated digit in a row,
    column or box): no answer can keep them, so the model is not asked."""
    broken = [p for p in rule_violations(grid) if "repeats" in p]
    if broken:
        raise ConfigError(f"the puzzle's givens break the rules ({'; '.join(broken)}); it has no solution")


def grid_text(grid: Sequence[int]) -> str:
    """Grid [81] -> 81 digits in one line (0 for a blank)."""
    return "".join(str(int(d)) for d in grid)


def givens_regex(puzzle: Sequence[int]) -> str:
    """A regular expression for answers that keep the givens: each given digit as itself, [1-9] at
    every blank (for `generate(..., regex=)`)."""
    return "".join(str(int(d)) if d else "[1-9]" for d in puzzle)


def rule_violations(grid: Sequence[int], puzzle: Sequence[int] | None = None) -> list[str]:
    """What is wrong with a filled grid: blanks, repeated digits in a row/column/box, changed givens."""
    grid = np.asarray(grid)
    problems = []
    blanks = np.flatnonzero(grid == 0)
    if len(blanks):
        problems.append(f"{len(blanks)} cell(s) not filled with 1-9")
    names = [f"row {i + 1}" for i in range(9)] + [f"column {i + 1}" for i in range(9)] + \
            [f"box {i + 1}" for i in range(9)]
    for name, unit in zip(names, _UNITS):
        digits = grid[unit][grid[unit] > 0]
        if len(set(digits.tolist())) != len(digits):
            problems.append(f"{name} repeats a digit")
    if puzzle is not None:
        puzzle = np.asarray(puzzle)
        changed = np.flatnonzero((puzzle > 0) & (grid != puzzle))
        if len(changed):
            problems.append(f"{len(changed)} given(s) changed")
    return problems


def count_solutions(grid: Sequence[int], limit: int = 2) -> int:
    """Number of solutions of a puzzle, counting no further than `limit`."""
    cells = [int(d) for d in grid]
    return _search(cells, limit, None)


def _candidates(cells: list[int], i: int) -> int:
    used = 0
    for p in _PEERS[i]:
        used |= 1 << cells[p]
    return _ALL & ~used


def _search(cells: list[int], limit: int, rng: np.random.Generator | None) -> int:
    """Backtracking with the fewest-candidates cell first; fills `cells` with the last solution
    found when it stops at the first one (limit=1).  rng shuffles the digit order."""
    best, best_mask, best_count = -1, 0, 10
    for i in range(CELLS):
        if cells[i] == 0:
            mask = _candidates(cells, i)
            n = bin(mask).count("1")
            if n < best_count:
                best, best_mask, best_count = i, mask, n
                if n <= 1:
                    break
    if best < 0:
        return 1
    digits = [d for d in range(1, 10) if best_mask >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    found = 0
    for d in digits:
        cells[best] = d
        found += _search(cells, limit - found, rng)
        if found >= limit:
            return found
    cells[best] = 0
    return found


def random_solution(rng: np.random.Generator) -> np.ndarray:
    """A uniformly shuffled search for a full valid grid [81] int8."""
    cells = [0] * CELLS
    _search(cells, 1, rng)
    return np.array(cells, np.int8)


def make_puzzle(rng: np.random.Generator, givens: int) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle [81], solution [81]) with exactly one solution and `givens` filled cells (or as few
    as this grid allows while staying unique, if that is more)."""
    if not 17 <= givens <= CELLS:
        raise ConfigError(f"givens must lie in 17..81, got {givens}")
    solution = random_solution(rng)
    puzzle = solution.copy()
    filled = CELLS
    for i in rng.permutation(CELLS):
        if filled <= givens:
            break
        puzzle[i] = 0
        if count_solutions(puzzle) == 1:
            filled -= 1
        else:
            puzzle[i] = solution[i]
    return puzzle, solution


def iter_puzzles(seed: int, n: int, difficulty: str | tuple[int, int] = "easy"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """n (puzzle, solution) pairs from `seed`, givens uniform in the difficulty's range, made one
    at a time (about 10 ms each for easy puzzles, 60 ms for hard ones)."""
    low, high = DIFFICULTY[difficulty] if isinstance(difficulty, str) else difficulty
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield make_puzzle(rng, int(rng.integers(low, high + 1)))


def puzzles(seed: int, n: int, difficulty: str | tuple[int, int] = "easy") -> list[tuple[np.ndarray, np.ndarray]]:
    """`iter_puzzles` as a list."""
    return list(iter_puzzles(seed, n, difficulty))


def test_set(n: int = 1000, difficulty: str | tuple[int, int] = "easy") -> list[tuple[np.ndarray, np.ndarray]]:
    """The held-out test set: the first n puzzles of the fixed test seed."""
    return puzzles(TEST_SEED, n, difficulty)


def validation_set(n: int = 1000, difficulty: str | tuple[int, int] = "easy") -> list[tuple[np.ndarray, np.ndarray]]:
    """The validation set (for choosing sampler settings): the first n puzzles of its own seed."""
    return puzzles(VALIDATION_SEED, n, difficulty)


SPLIT_SEEDS = {"test": TEST_SEED, "validation": VALIDATION_SEED}


# ---------------------------------------------------------------------------------------- tokens

def prompt_ids(puzzle: Sequence[int]) -> np.ndarray:
    """The chat-free prompt [83]: <bos>, the 81 cells (blank = "0"), <sep>."""
    cells = np.asarray(puzzle, np.int64) + DIGIT_OFFSET
    return np.concatenate([[BOS], cells, [SEP]]).astype(np.int64)


def solution_ids(solution: Sequence[int]) -> np.ndarray:
    """The canvas target [81]: the solution's digits as token ids."""
    return np.asarray(solution, np.int64) + DIGIT_OFFSET


def grid_from_ids(ids: Sequence[int]) -> np.ndarray:
    """Canvas ids [81] -> grid [81]; a token that is not a digit 1-9 becomes a blank (0)."""
    digits = np.asarray(ids, np.int64)[:CELLS] - DIGIT_OFFSET
    grid = np.where((digits >= 1) & (digits <= 9), digits, 0).astype(np.int8)
    return np.pad(grid, (0, CELLS - len(grid)))


# ---------------------------------------------------------------------------------------- solving

@dataclass
class Solution:
    """A model's answer to one puzzle."""

    puzzle: np.ndarray          # [81], 0 = blank
    grid: np.ndarray            # [81] the canvas read as digits, 0 where it is not a digit
    steps: int                  # denoising steps used
    problems: list[str]         # rule violations (empty = a valid solution)

    @property
    def solved(self) -> bool:
        """A valid, complete grid that keeps every given (unique puzzles: the solution)."""
        return not self.problems

    @property
    def line(self) -> str:
        """The answer as one line of 81 digits."""
        return grid_text(self.grid)


def solve(model: Any, puzzle: str | Sequence[int], **generate_options: Any) -> Solution:
    """Solve one puzzle with `portable_dg.generate` on a loaded model (one 81-token canvas).

    generate_options go to generate (seed, noise, greedy, on_step, max_denoising_steps, ...)."""
    from .sampler import generate

    grid = parse_puzzle(puzzle) if isinstance(puzzle, str) else np.asarray(puzzle, np.int8)
    check_givens(grid)
    if model.canvas_length < CELLS:
        raise ConfigError(f"this model's canvas holds {model.canvas_length} tokens; a Sudoku needs {CELLS}")
    out = generate(model, prompt_ids(grid), max_new_tokens=CELLS, **generate_options)
    answer = grid_from_ids(out.sequences[0, out.prompt_length:])
    return Solution(grid, answer, sum(out.steps), rule_violations(answer, grid))


@dataclass
class Evaluation:
    """Scores of a model on a set of puzzles."""

    puzzles: int
    solved: int
    cells_correct: float        # fraction of blank cells equal to the unique solution
    mean_steps: float
    answers: list[str]          # each answer's 81-digit line, in order

    @property
    def solve_rate(self) -> float:
        """Fraction of puzzles solved."""
        return self.solved / max(1, self.puzzles)

    def summary(self) -> str:
        """One line for people."""
        return (f"solved {self.solved}/{self.puzzles} ({100 * self.solve_rate:.1f}%), "
                f"blank cells correct {100 * self.cells_correct:.1f}%, "
                f"mean denoising steps {self.mean_steps:.2f}")


def score(pairs: Sequence[tuple[np.ndarray, np.ndarray]], answers: Sequence[np.ndarray],
          steps: Sequence[int]) -> Evaluation:
    """An Evaluation of answers [81] against (puzzle, solution) pairs."""
    solved, right, blanks = 0, 0, 0
    for (puzzle, solution), answer in zip(pairs, answers):
        solved += not rule_violations(answer, puzzle)
        open_cells = puzzle == 0
        right += int((answer[open_cells] == solution[open_cells]).sum())
        blanks += int(open_cells.sum())
    return Evaluation(len(pairs), solved, right / max(1, blanks), float(np.mean(steps)) if steps else 0.0,
                      [grid_text(a) for a in answers])


def evaluate(model: Any, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, batch: int = 16,
             progress: Callable[[int], Any] | None = None, **generate_options: Any) -> Evaluation:
    """Solve every puzzle of (puzzle, solution) pairs, `batch` at a time (each puzzle's answer is
    what it gets alone: the same options, its own random stream); `progress(n)` after each batch
    of n puzzles."""
    from .engine import generate_batch

    answers, steps = [], []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        outs = generate_batch(model, [prompt_ids(puzzle) for puzzle, _ in chunk], max_new_tokens=CELLS,
                              **generate_options)
        for out in outs:
            answers.append(grid_from_ids(out.sequences[0, out.prompt_length:]))
            steps.append(sum(out.steps))
        if progress is not None:
            progress(len(chunk))
    return score(pairs, answers, steps)
