"""`pdg serve` as a user runs it: no --model serves the bundled Sudoku model (the README example)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from portable_dg.cli import main
from serving import assert_solves, request

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


@pytest.fixture(scope="module")
def pdg_serve():
    """`pdg serve --port 0 --api-key k` in a child process; yields its base URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "portable_dg.cli", "serve", "--port", "0", "--api-key", "k",
                              "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert match, line
        url = match.group(1)
        for _ in range(200):                       # the socket listens before uvicorn is up
            status, _, _ = request(url + "/health")
            if status == 200:
                break
        yield url
    finally:
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 0
        child.stderr.close()


def test_readme_example_offline(pdg_serve):
    from openai import OpenAI

    client = OpenAI(base_url=pdg_serve + "/v1", api_key="k")
    assert [m.id for m in client.models.list().data] == ["sudoku"]
    reply = client.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": PUZZLE}])
    assert_solves(reply.choices[0].message.content, [0 if c == "." else int(c) for c in PUZZLE])
    status, _, page = request(pdg_serve + "/")
    assert status == 200 and "<title>portable_dg</title>" in page
    status, _, script = request(pdg_serve + "/static/app.js")
    assert status == 200 and "include_drafts" in script


@pytest.mark.parametrize("args, message", [
    (["--max-concurrent", "0"], "max_concurrent must be at least 1"),
    (["--timeout", "0"], "timeout_s > 0"),
    (["--api-key", " "], "API key is empty"),
    (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_bad_options_are_one_line_errors(args, message):
    result = CliRunner().invoke(main, ["serve", "--port", "0", *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
