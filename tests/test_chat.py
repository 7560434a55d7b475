"""`pdg chat`: the session (history, system prompt, reset, prompts that extend each other) and the
terminal program driven through a pseudo-terminal."""

from __future__ import annotations

import io
import re
import sys

import pytest

import portable_dg
from portable_dg import sudoku as sd
from portable_dg.commands.chat import ChatSession
from portable_dg.errors import PortableDGError


# Gemma's turn format, with its mapping of the assistant role to "model" (which the synthetic
# checkpoint's simpler template lacks): a conversation then renders as the last prompt plus answer.
GEMMA_TURNS = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
               "\n{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from portable_dg.synth import write_synthetic

    path = tmp_path_factory.mktemp("synth") / "tiny"
    write_synthetic(path, like="tiny", dtype="f32")
    (path / "chat_template.jinja").write_text(GEMMA_TURNS)
    return portable_dg.load(path)


def test_session_keeps_history_and_each_prompt_extends_the_last(text_model):
    session = ChatSession(text_model, system="be brief", max_tokens=16, seed=0)
    first_prompt = session.prompt_ids("hi")
    first = session.reply("hi")
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first.text}]
    second_prompt = session.prompt_ids("more")
    tok = text_model.tokenizer
    rendered = tok.decode(second_prompt, skip_special_tokens=False)
    assert rendered.startswith("<bos><|turn>system\nbe brief<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")
    assert rendered.endswith("<turn|>\n<|turn>user\nmore<turn|>\n<|turn>model\n")
    assert second_prompt[:len(first_prompt)] == first_prompt      # what prefix reuse of the KV cache keys on
    second = session.reply("more")
    assert len(session.history) == 4 and second.steps and second.tokens <= 16
    session.reset()
    assert session.history == [] and session.prompt_ids("hi") == first_prompt


def test_session_reply_is_the_engine_run_alone(text_model):
    session = ChatSession(text_model, max_tokens=32, seed=4)
    streamed = []
    reply = session.reply("hello", on_text=streamed.append)
    out = portable_dg.generate(text_model, ChatSession(text_model).prompt_ids("hello"), max_new_tokens=32, seed=4)
    assert reply.text == "".join(streamed) == text_model.tokenizer.decode(out.ids[:32])
    assert reply.steps == out.steps


def test_an_interrupted_reply_leaves_no_history(text_model):
    session = ChatSession(text_model, max_tokens=64, seed=0)
    steps = []
    assert session.reply("hi", on_step=steps.append, interrupted=lambda: len(steps) >= 2) is None
    assert session.history == [] and len(steps) == 2 and session.engine.active == 0


def test_session_checks_its_options_at_once(text_model):
    with pytest.raises(PortableDGError, match="max_denoising_steps"):
        ChatSession(text_model, max_denoising_steps=0)


def test_pdg_chat_in_a_terminal():
    """A puzzle typed at the prompt is answered; /reset, a bad message and /exit behave."""
    pexpect = pytest.importorskip("pexpect")
    puzzle, solution = sd.test_set(1)[0]
    log = io.StringIO()
    child = pexpect.spawn(sys.executable, ["-m", "portable_dg.cli", "chat", "--seed", "0"], encoding="utf-8",
                          timeout=120, dimensions=(40, 160))
    child.logfile_read = log
    try:
        child.expect("> ")
        child.sendline("Please solve: " + sd.grid_text(puzzle).replace("0", "."))
        child.expect(r"\[81 tokens · 1 canvas · steps (\d+) · [\d.]+ s\]")
        steps = int(child.match.group(1))
        answer = re.findall(r"[1-9]{81}", child.before)[-1]          # the last line before the stats
        assert not sd.rule_violations(sd.parse_puzzle(answer), puzzle)
        assert log.getvalue().count("[canvas 1 · step") == steps       # the live canvas, one redraw per step
        child.expect("> ")
        child.sendline("/system You solve Sudoku.")
        child.expect("system prompt: You solve Sudoku.")
        child.sendline("/reset")
        child.expect("history cleared")
        child.sendline("what is 2 + 2?")
        child.expect("error: chat template: .*puzzle")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_turns_reuse_the_previous_cache(tmp_path):
    """The second turn's prompt extends the first's: its cache row is reused, only the rest encoded."""
    from portable_dg.commands.chat import ChatSession
    from portable_dg.synth import write_synthetic

    import portable_dg

    path = tmp_path / "tiny"
    write_synthetic(path, like="tiny", dtype="f32")
    session = ChatSession(portable_dg.load(path), max_tokens=16, seed=0)
    encoded = []
    encode = session.engine.network.encode
    session.engine.network.encode = lambda ids, cache, rows: (encoded.append(ids.shape[1]), encode(ids, cache, rows))
    session.reply("hello there")
    first = session.prompt_ids("again")
    session.reply("again")
    assert encoded[0] > 0 and encoded[-1] < len(first)           # the second prompt was not encoded whole
