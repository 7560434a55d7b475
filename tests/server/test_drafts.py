"""Draft events: opt-in, one per denoising step in order, ending with the committed canvas; clients
that do not know them are unaffected."""

from __future__ import annotations

import pytest

import portable_dg
from portable_dg import sudoku as sd
from serving import assert_solves, sse_events


def drafts_of(events):
    return [data["draft"] for name, data in events if name == "draft"]


def test_one_draft_per_step_then_the_committed_canvas(sudoku_server, sudoku_model, puzzles):
    text, grid = puzzles[0]
    seen = []
    direct = sd.solve(sudoku_model, grid, seed=2, on_step=seen.append)
    events = sse_events(sudoku_server.api + "/chat/completions", {
        "messages": [{"role": "user", "content": text}], "seed": 2, "stream": True,
        "stream_options": {"include_drafts": True}})
    drafts = drafts_of(events)
    assert [d["step"] for d in drafts[:-1]] == list(range(1, direct.steps + 1))
    assert [d["committed"] for d in drafts] == [False] * direct.steps + [True]
    assert [d["text"] for d in drafts[:-1]] == [sd.grid_text(sd.grid_from_ids(i.draft)) for i in seen]
    assert [d["accepted"] for d in drafts[:-1]] == [i.accepted for i in seen]
    assert drafts[-2]["stopped"] == seen[-1].stopped
    assert [d["mean_entropy"] for d in drafts[:-1]] == pytest.approx([i.mean_entropy for i in seen])
    assert all(len(d["tokens"]) == 81 and d["canvas"] == 0 for d in drafts)
    elapsed = [d["elapsed_ms"] for d in drafts]
    assert elapsed == sorted(elapsed)
    committed = drafts[-1]
    content = "".join(data["choices"][0]["delta"].get("content", "") for name, data in events
                      if name is None and data != "[DONE]" and data["choices"])
    assert committed["text"] == "".join(committed["tokens"]) == content == direct.line
    assert_solves(content, grid)
    # drafts come before the text they lead to; the stream still ends with [DONE]
    kinds = [name or ("text" if data != "[DONE]" and data["choices"] and data["choices"][0]["delta"].get("content")
                      else "other") for name, data in events]
    assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "draft")
    assert events[-1] == (None, "[DONE]")


def test_drafts_are_chunks_with_no_choices(sudoku_server, puzzles):
    """What a standard parser sees: every event is a valid chat.completion.chunk; drafts carry
    `choices: []`, like the usage chunk."""
    text, _ = puzzles[1]
    events = sse_events(sudoku_server.api + "/chat/completions", {
        "messages": [{"role": "user", "content": text}], "seed": 0, "stream": True,
        "stream_options": {"include_drafts": True, "include_usage": True}})
    for name, data in events[:-1]:
        assert data["object"] == "chat.completion.chunk" and isinstance(data["choices"], list)
        assert (name == "draft") == ("draft" in data)
        if name == "draft":
            assert data["choices"] == []


def test_no_drafts_unless_asked(sudoku_server, puzzles):
    text, _ = puzzles[2]
    events = sse_events(sudoku_server.api + "/chat/completions", {
        "messages": [{"role": "user", "content": text}], "seed": 0, "stream": True})
    assert not drafts_of(events) and all(name is None for name, _ in events)


def test_openai_client_reads_a_stream_with_drafts_unchanged(sudoku_server, puzzles):
    text, grid = puzzles[3]
    client = sudoku_server.client()
    messages = [{"role": "user", "content": text}]
    plain = list(client.chat.completions.create(model="sudoku", messages=messages, seed=4, stream=True))
    with_drafts = list(client.chat.completions.create(model="sudoku", messages=messages, seed=4, stream=True,
                                                      stream_options={"include_drafts": True}))
    assert len(with_drafts) > len(plain)

    def content(chunks):
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert content(with_drafts) == content(plain)
    assert_solves(content(plain), grid)
    drafts = [c.draft for c in with_drafts if not c.choices]
    assert drafts[-1]["committed"] and drafts[-1]["text"] == content(plain)


def test_drafts_of_several_canvases(text_server, text_model):
    """Each canvas's steps count from 1; each canvas ends with its committed event."""
    seen = []
    out = portable_dg.generate(text_model, [2] + text_model.tokenizer.encode("abc"), max_new_tokens=40, seed=9,
                               on_step=seen.append)
    events = sse_events(text_server.api + "/completions", {
        "prompt": "abc", "max_tokens": 40, "seed": 9, "stream": True, "stream_options": {"include_drafts": True}})
    drafts = drafts_of(events)
    expected = []
    for info in seen:
        expected.append((info.block, info.step, False))
        if info.stopped or info.steps_left == 1:
            expected.append((info.block, info.step, True))
    assert [(d["canvas"], d["step"], d["committed"]) for d in drafts] == expected
    assert len(out.steps) == len({d["canvas"] for d in drafts})
