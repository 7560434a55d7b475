"""The OpenAI-compatible endpoints, read by the official openai client (pinned in the test extra)."""

from __future__ import annotations

import pytest

import portable_dg
from portable_dg import sudoku as sd
from serving import assert_solves

openai = pytest.importorskip("openai")


def test_models_list_the_served_model(sudoku_server):
    models = sudoku_server.client().models.list()
    assert [m.id for m in models.data] == ["sudoku"]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "portable_dg"
    assert card.canvas_length == 81 and card.defaults["max_denoising_steps"] == 48
    assert sudoku_server.client().models.retrieve("sudoku").id == "sudoku"
    with pytest.raises(openai.NotFoundError):
        sudoku_server.client().models.retrieve("gpt-4o")


def test_chat_completion_solves_a_puzzle(sudoku_server, sudoku_model, puzzles):
    text, grid = puzzles[0]
    reply = sudoku_server.client().chat.completions.create(
        model="sudoku", messages=[{"role": "system", "content": "You solve Sudoku."},
                                  {"role": "user", "content": f"Please solve this one: {text}"}], seed=0)
    assert reply.object == "chat.completion" and reply.model == "sudoku" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.index == 0
    assert_solves(choice.message.content, grid)
    assert choice.finish_reason == "length"                  # the Sudoku model fills its canvas, no EOS
    assert reply.usage.prompt_tokens == 83 and reply.usage.completion_tokens == 81
    assert reply.usage.total_tokens == 164
    direct = sd.solve(sudoku_model, grid, seed=0)             # the server runs the same sampler
    assert choice.message.content == direct.line and reply.model_extra["denoising_steps"] == [direct.steps]


def test_streamed_chat_completion_matches_the_plain_one(sudoku_server, puzzles):
    text, grid = puzzles[1]
    client = sudoku_server.client()
    messages = [{"role": "user", "content": text}]
    plain = client.chat.completions.create(model="sudoku", messages=messages, seed=5)
    chunks = list(client.chat.completions.create(model="sudoku", messages=messages, seed=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert_solves(content, grid)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 81


def test_same_seed_same_answer(sudoku_server, puzzles):
    text, _ = puzzles[2]
    client = sudoku_server.client()
    runs = [client.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": text}],
                                           seed=11, extra_body={"max_denoising_steps": 3, "t_min": 1.0,
                                                                "t_max": 2.0})
            for _ in range(2)]
    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content
    assert runs[0].model_extra["denoising_steps"] == [3]


def test_completion_with_suffix_fills_the_gap(sudoku_server, puzzles):
    """The last 30 cells of the solution are given as the suffix; the model writes the 51 before."""
    text, grid = puzzles[3]
    solution = next(s for p, s in sd.test_set(64) if (p == grid).all())
    suffix = sd.grid_text(solution[51:])
    prompt = "<bos>" + text + "<sep>"
    client = sudoku_server.client()
    kwargs = dict(model="sudoku", prompt=prompt, suffix=suffix, max_tokens=51, seed=0)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert first.object == "text_completion"
    gap = first.choices[0].text
    assert len(gap) == 51 and gap == second.choices[0].text
    assert_solves(gap + suffix, grid)
    assert first.usage.completion_tokens == 51 and first.usage.prompt_tokens == 83


def test_text_completion_stream_and_stop(text_server, text_model):
    """Several canvases stream as they commit; a stop string cuts the text and ends the stream."""
    client = text_server.client()
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=3)
    text = plain.choices[0].text
    out = portable_dg.generate(text_model, [2] + text_model.tokenizer.encode("Hello"), max_new_tokens=64, seed=3)
    assert text == text_model.tokenizer.decode(out.ids[:64])
    assert plain.usage.completion_tokens == min(64, len(out.ids))
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=3, stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert "".join(pieces) == text and len(pieces) > 1            # one piece per committed canvas
    stop = text[20:23]
    stopped = client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=3, stop=[stop])
    assert stopped.choices[0].text == text[:text.find(stop)] and stopped.choices[0].finish_reason == "stop"


def test_max_tokens_truncates_within_a_canvas(text_server):
    reply = text_server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=5, seed=1)
    assert reply.usage.completion_tokens <= 5


def test_temperature_zero_is_greedy(sudoku_server, sudoku_model, puzzles):
    text, grid = puzzles[4]
    reply = sudoku_server.client().chat.completions.create(
        model="sudoku", messages=[{"role": "user", "content": text}], temperature=0, seed=1)
    direct = sd.solve(sudoku_model, grid, seed=1, greedy=True)
    assert reply.choices[0].message.content == direct.line
