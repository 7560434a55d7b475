"""Bad requests get the right 4xx with an OpenAI error object, and none of them hurts the server."""

from __future__ import annotations

import pytest

from serving import assert_solves, request, running_server

openai = pytest.importorskip("openai")

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def chat(**fields):
    return {"messages": [{"role": "user", "content": PUZZLE}], **fields}


BAD_REQUESTS = [
    # (body, status, param, message fragment)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (chat(max_tokens="10"), 400, "max_tokens", "valid integer"),
    (chat(max_tokens=10.0), 400, "max_tokens", "valid integer"),
    (chat(stream="yes"), 400, "stream", "valid boolean"),
    (chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (chat(max_denoising_steps=-3), 400, "max_denoising_steps", "positive integer"),
    (chat(t_min=0.9, t_max=0.5), 400, None, "t_max > t_min"),
    (chat(entropy_bound=-1.0), 400, "entropy_bound", ">= 0"),
    (chat(seed=-1), 400, "seed", "greater than or equal to 0"),
    (chat(n=2), 400, "n", "Input should be 1"),
    (chat(max_denoise_steps=4), 400, "max_denoise_steps", "Unrecognized request argument"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
    (chat(logprobs=True), 400, "logprobs", "not supported"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "up to 4"),
    (chat(stream_options={"include_usage": True}), 400, None, "only allowed when stream is true"),
    (chat(max_tokens=100_000), 400, "max_tokens", "more than this server allows"),
    (chat(max_tokens=500), 400, None, "exceeds the model's context"),
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "Input should be"),
    ({"messages": [{"role": "user", "content": "no puzzle here"}]}, 400, "messages", "needs a user message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages", "only text"),
    (chat(model="gpt-4o"), 404, "model", "does not exist"),
]


@pytest.fixture(scope="module")
def server(sudoku_model):
    with running_server(sudoku_model, max_tokens=1000, max_body_bytes=20_000) as running:
        yield running


@pytest.mark.parametrize("body, status, param, fragment", BAD_REQUESTS,
                         ids=[f"{i}-{case[1]}-{case[2]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_chat_requests(server, body, status, param, fragment):
    got, _, content = request(server.api + "/chat/completions", body)
    assert got == status, content
    error = content["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]


@pytest.mark.parametrize("path, body, param, fragment", [
    ("/completions", {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ("/completions", {"prompt": [2, 99]}, "prompt", "must lie in"),
    ("/completions", {"prompt": "<bos>", "suffix": "1" * 81}, "suffix", "no gap"),
    ("/completions", {"prompt": "<bos>", "echo": True}, "echo", "not supported"),
])
def test_bad_completion_requests(server, path, body, param, fragment):
    got, _, content = request(server.api + path, body)
    assert got == 400 and content["error"]["param"] == param and fragment in content["error"]["message"]


def test_oversize_body(server):
    status, _, content = request(server.api + "/chat/completions", chat(padding="x" * 30_000))
    assert status == 413 and content["error"]["code"] == "request_too_large"


def test_unknown_route_and_method(server):
    status, _, content = request(server.api + "/embeddings", {"input": "x"})
    assert status == 404 and "error" in content
    status, _, content = request(server.api + "/chat/completions", method="GET")
    assert status == 405 and "error" in content


def test_the_server_still_serves_after_bad_requests(server):
    for body, *_ in BAD_REQUESTS:
        request(server.api + "/chat/completions", body)
    status, _, content = request(server.api + "/chat/completions", chat(seed=0))
    assert status == 200 and server.service.in_flight == 0
    assert_solves(content["choices"][0]["message"]["content"], [0] * 81)


def test_api_key(sudoku_model):
    with running_server(sudoku_model, api_key="s3cret") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, got, content = request(server.api + "/chat/completions", chat(), headers)
            assert status == 401 and content["error"]["code"] == "invalid_api_key"
            assert got["www-authenticate"] == "Bearer"
        status, _, _ = request(server.api + "/models")
        assert status == 401
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert server.client(api_key="s3cret").models.list().data[0].id == "sudoku"
        status, _, _ = request(server.url + "/health")               # the page and /health stay open
        assert status == 200
        status, _, _ = request(server.url + "/")
        assert status == 200


def test_openai_client_raises_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": PUZZLE}],
                                       extra_body={"max_denoising_steps": 0})
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_denoising_steps"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": PUZZLE}])
