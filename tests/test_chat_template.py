"""The bundled Sudoku model's chat template: the puzzle in the last user message becomes the
model's prompt (<bos> + 81 cells + <sep>), identically in portable_dg and transformers 5.23.0."""

from __future__ import annotations

import pytest

from portable_dg import sudoku as sd
from portable_dg.errors import PortableDGError
from portable_dg.tokenizer import Tokenizer

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
ROWS = "\n".join(PUZZLE[i:i + 9] for i in range(0, 81, 9))


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_directory(sd.default_model_path())


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(sd.default_model_path()))


MESSAGES = [
    [{"role": "user", "content": PUZZLE}],
    [{"role": "user", "content": f"Solve this one: {PUZZLE}."}],             # a sentence's full stop
    [{"role": "user", "content": f"Puzzle 3 {PUZZLE}"}],                    # a number before it
    [{"role": "user", "content": f"Please solve\n{ROWS}\nthanks"}],          # nine lines of nine
    [{"role": "user", "content": PUZZLE.replace(".", "0")}],
    [{"role": "user", "content": [{"type": "text", "text": "solve"}, {"type": "text", "text": PUZZLE}]}],
    [{"role": "system", "content": "You solve Sudoku 9x9."}, {"role": "user", "content": "1" * 81},
     {"role": "assistant", "content": "2" * 81}, {"role": "user", "content": PUZZLE}],   # only the last turn
]


@pytest.mark.parametrize("messages", MESSAGES)
def test_the_last_puzzle_becomes_the_prompt(ours, theirs, messages):
    text = ours.apply_chat_template(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    grid = sd.parse_puzzle(PUZZLE)
    assert ours.encode(text) == sd.prompt_ids(grid).tolist()


@pytest.mark.parametrize("content", ["hello", PUZZLE + "1", PUZZLE[:80], "1 2 3"])
def test_no_puzzle_is_an_error(ours, theirs, content):
    messages = [{"role": "user", "content": content}]
    with pytest.raises(PortableDGError, match="needs a user message holding a puzzle"):
        ours.apply_chat_template(messages)
    with pytest.raises(Exception, match="needs a user message holding a puzzle"):
        theirs.apply_chat_template(messages, tokenize=False)


def test_pdg_generate_answers_a_puzzle_through_the_template():
    """`pdg generate --prompt` applies a checkpoint's chat template: the bundled model now solves."""
    from click.testing import CliRunner

    from portable_dg.cli import main

    result = CliRunner().invoke(main, ["generate", "--prompt", f"Solve {PUZZLE}", "--seed", "0"])
    assert result.exit_code == 0, result.output
    answer = result.stdout.strip().splitlines()[0]
    assert sd.rule_violations(sd.parse_puzzle(answer), sd.parse_puzzle(PUZZLE)) == []
