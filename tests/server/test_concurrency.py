"""Requests run together through the engine; a dropped client frees its slot; a full queue is
refused at once and the server serves normally afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from portable_dg import sudoku as sd
from serving import assert_solves, event_stream, request, running_server

# a request that takes thousands of steps: the early stop can never fire
LONG = {"max_denoising_steps": 5000, "confidence_threshold": 1e-30, "seed": 0}


def streamed_answer(server, text: str, seed: int) -> str:
    chunks = server.client().chat.completions.create(model="sudoku", messages=[{"role": "user", "content": text}],
                                                     seed=seed, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_concurrent_streams_all_complete_correctly(sudoku_model, puzzles, clients=6):
    with running_server(sudoku_model, max_concurrent=clients) as server:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda i: streamed_answer(server, puzzles[i][0], seed=i), range(clients)))
        assert server.service.worker.steps > 0
    for i, answer in enumerate(answers):                        # each equals its own run alone
        assert answer == sd.solve(sudoku_model, puzzles[i][1], seed=i).line
        assert_solves(answer, puzzles[i][1])


def test_more_clients_than_slots_queue(sudoku_model, puzzles):
    with running_server(sudoku_model, max_concurrent=2, max_queue=6) as server:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: streamed_answer(server, puzzles[i][0], seed=0), range(8)))
    for (text, grid), answer in zip(puzzles, answers):
        assert_solves(answer, grid)


def test_a_dropped_client_frees_its_slot(sudoku_model, puzzles):
    with running_server(sudoku_model, max_concurrent=4) as server:
        long_body = {"messages": [{"role": "user", "content": puzzles[0][0]}], "stream": True,
                     "stream_options": {"include_drafts": True}, **LONG}
        with ThreadPoolExecutor(3) as pool:
            others = [pool.submit(streamed_answer, server, puzzles[i][0], i) for i in (1, 2, 3)]
            with event_stream(server.api + "/chat/completions", long_body) as events:
                for name, _ in events:
                    if name == "draft":
                        break                                     # it is running: now hang up
                server.wait(lambda s: s.worker.active >= 1)
            server.wait(lambda s: s.in_flight == sum(not f.done() for f in others))
            answers = [f.result() for f in others]
        server.wait(lambda s: s.in_flight == 0 and s.worker.active == 0)
        assert server.service.worker.steps < 1000                # the 5000-step request did not run on
    for i, answer in zip((1, 2, 3), answers):
        assert_solves(answer, puzzles[i][1])


def test_a_dropped_non_streaming_client_frees_its_slot(sudoku_model, puzzles):
    import http.client
    import json

    with running_server(sudoku_model) as server:
        port = int(server.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": puzzles[0][0]}], **LONG}),
            {"Content-Type": "application/json"})
        server.wait(lambda s: s.worker.active == 1)
        connection.close()
        server.wait(lambda s: s.in_flight == 0 and s.worker.active == 0)


def test_a_full_queue_is_refused_at_once_then_serves_again(sudoku_model, puzzles):
    with running_server(sudoku_model, max_concurrent=1, max_queue=1) as server:
        body = {"messages": [{"role": "user", "content": puzzles[0][0]}], "stream": True, **LONG}
        with event_stream(server.api + "/chat/completions", body) as first, \
                event_stream(server.api + "/chat/completions", body) as second:
            next(first), next(second)
            server.wait(lambda s: s.in_flight == 2)
            started = time.monotonic()
            refused = [request(server.api + "/chat/completions",
                               {"messages": [{"role": "user", "content": puzzles[1][0]}]}) for _ in range(5)]
            assert time.monotonic() - started < 5
            for status, headers, content in refused:
                assert status == 429 and headers["retry-after"] == "1"
                assert content["error"]["type"] == "rate_limit_error" and content["error"]["code"] == "server_busy"
        server.wait(lambda s: s.in_flight == 0)
        status, _, content = request(server.api + "/chat/completions",
                                     {"messages": [{"role": "user", "content": puzzles[1][0]}], "seed": 0})
        assert status == 200
        assert_solves(content["choices"][0]["message"]["content"], puzzles[1][1])


def test_request_timeout(sudoku_model, puzzles):
    with running_server(sudoku_model, timeout_s=0.5) as server:
        status, _, content = request(server.api + "/chat/completions",
                                     {"messages": [{"role": "user", "content": puzzles[0][0]}], **LONG})
        assert status == 504 and content["error"]["code"] == "timeout"
        with event_stream(server.api + "/chat/completions",
                          {"messages": [{"role": "user", "content": puzzles[0][0]}], "stream": True, **LONG}) as events:
            last = list(events)[-2:]
        assert '"timeout"' in last[0][1] and last[1][1] == "[DONE]"
        server.wait(lambda s: s.in_flight == 0 and s.worker.active == 0)
