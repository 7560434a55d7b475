"""Infill and edit: the canvas plan (pinned spans, gaps, EOS after the text) and the endpoints that
use it (/v1/completions with suffix, llama.cpp's /infill, /edit)."""

from __future__ import annotations

import numpy as np
import pytest

from portable_dg import sudoku as sd
from portable_dg.errors import ConfigError
from portable_dg.server.canvas import Span, edit_spans, infill_spans, plan_canvas
from serving import assert_solves, request, sse_events


def test_plan_pins_kept_spans_then_eos_and_padding():
    spans = [Span([7, 8], False, 3), Span([5, 6], True, 2), Span([], False, 2)]
    plan = plan_canvas(spans, 10, 100, eos_id=1, pad_id=0, rng=np.random.default_rng(0))
    assert plan.starts == [0, 3, 5]
    assert plan.pinned == {3: 5, 4: 6, 7: 1, 8: 0, 9: 0}
    assert plan.start_canvas[:2].tolist() == [7, 8]            # the old text seeds the rewrite
    assert plan.start_canvas[3:5].tolist() == [5, 6] and plan.start_canvas[7:].tolist() == [1, 0, 0]
    again = plan_canvas(spans, 10, 100, eos_id=1, pad_id=0, rng=np.random.default_rng(0))
    assert np.array_equal(plan.start_canvas, again.start_canvas)
    canvas = [9, 9, 9, 5, 6, 4, 1, 1, 0, 0]                    # the second gap ends early at an EOS
    assert plan.span_ids(canvas, {0, 1}) == [[9, 9, 9], [5, 6], [4]]


def test_a_full_canvas_pins_no_eos():
    plan = plan_canvas([Span([], False, 2), Span([3, 4], True, 2)], 4, 10, 1, 0, np.random.default_rng(0))
    assert plan.pinned == {2: 3, 3: 4}


def test_spans_that_do_not_fit_are_refused(sudoku_model):
    with pytest.raises(ConfigError, match="a canvas holds 4"):
        plan_canvas([Span([], False, 3), Span([1, 2], True, 2)], 4, 10, 1, 0, np.random.default_rng(0))
    tok = sudoku_model.tokenizer
    with pytest.raises(ConfigError, match="no gap"):
        infill_spans(tok, "1" * 81, None, 81)
    with pytest.raises(ConfigError, match="no gap"):
        infill_spans(tok, "1" * 40, 42, 81)
    assert [s.length for s in infill_spans(tok, "1" * 30, None, 81)] == [50, 30]
    with pytest.raises(ConfigError, match="cannot take length"):
        edit_spans(tok, [("123", True, 5)])
    assert [(s.ids, s.keep, s.length) for s in edit_spans(tok, [("12", True, None), ("3", False, 4)])] == \
        [([5, 6], True, 2), ([7], False, 4)]


@pytest.fixture(scope="module")
def case():
    puzzle, solution = sd.test_set(8)[5]
    return sd.grid_text(puzzle), puzzle, sd.grid_text(solution)


def test_infill_endpoint_in_llama_cpp_shape(sudoku_server, case):
    text, grid, solution = case
    body = {"input_prefix": text + "<sep>", "input_suffix": solution[60:], "n_predict": 60, "seed": 0,
            "cache_prompt": True, "samplers": ["top_k"]}                 # llama.cpp-only options are ignored
    status, _, reply = request(sudoku_server.url + "/infill", body)
    assert status == 200, reply
    assert reply["stop"] is True and reply["tokens_predicted"] == 60 and reply["tokens_evaluated"] == 83
    assert_solves(reply["content"] + solution[60:], grid)
    events = sse_events(sudoku_server.url + "/infill", {**body, "stream": True})
    assert [e["stop"] for _, e in events] == [False, True]
    assert events[0][1]["content"] == reply["content"] and events[1][1]["content"] == ""


def test_suffix_drafts_show_the_pinned_suffix(sudoku_server, case):
    text, grid, solution = case
    events = sse_events(sudoku_server.api + "/completions", {
        "prompt": text + "<sep>", "suffix": solution[40:], "max_tokens": 40, "seed": 0, "stream": True,
        "stream_options": {"include_drafts": True}})
    drafts = [data["draft"] for name, data in events if name == "draft"]
    assert drafts and all("".join(d["tokens"][40:]) == solution[40:] for d in drafts)
    content = "".join(data["choices"][0]["text"] for name, data in events if name is None and data != "[DONE]")
    assert content == "".join(drafts[-1]["tokens"][:40])
    assert_solves(content + solution[40:], grid)


def test_edit_keeps_kept_spans_and_rewrites_the_rest(sudoku_server, case):
    text, grid, solution = case
    wrong = "".join(str(int(d) % 9 + 1) for d in solution[27:54])       # every digit shifted: all wrong
    body = {"prompt": text + "<sep>", "seed": 0, "segments": [
        {"text": solution[:27], "keep": True}, {"text": wrong, "keep": False},
        {"text": solution[54:], "keep": True}]}
    status, _, reply = request(sudoku_server.url + "/edit", body)
    assert status == 200, reply
    assert reply["object"] == "edit" and [s["keep"] for s in reply["segments"]] == [True, False, True]
    assert reply["segments"][0]["text"] == solution[:27] and reply["segments"][2]["text"] == solution[54:]
    assert reply["text"] == "".join(s["text"] for s in reply["segments"])
    assert_solves(reply["text"], grid)
    assert reply["usage"]["completion_tokens"] == 27
    chat = {**body, "messages": [{"role": "user", "content": text}]}
    del chat["prompt"]
    status, _, by_chat = request(sudoku_server.url + "/edit", chat)      # the same prompt, via the template
    assert status == 200 and by_chat["text"] == reply["text"]


def test_edit_errors(sudoku_server):
    status, _, reply = request(sudoku_server.url + "/edit", {"prompt": "x", "messages": [], "segments": [
        {"text": "1", "keep": True}]})
    assert status == 400 and reply["error"]["param"] == "messages"
    status, _, reply = request(sudoku_server.url + "/edit", {"segments": [{"text": "1" * 90, "keep": True}]})
    assert status == 400 and "a canvas holds 81" in reply["error"]["message"]
    status, _, reply = request(sudoku_server.url + "/edit", {"segments": []})
    assert status == 400 and reply["error"]["param"] == "segments"


def test_text_model_infill_default_gap(text_server, text_model):
    """No max_tokens: the gap is the rest of the canvas less one position for EOS."""
    suffix_ids = text_model.tokenizer.encode("xyz")
    reply = text_server.client().completions.create(model="tiny", prompt="abc", suffix="xyz", seed=1)
    gap = text_model.canvas_length - len(suffix_ids) - 1
    assert 0 <= reply.usage.completion_tokens <= gap
