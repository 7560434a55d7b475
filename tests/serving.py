"""Helpers of the server tests: a server started in a thread of the test process on a free
loopback port, and the Sudoku answer check."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass

from portable_dg import sudoku as sd


@dataclass
class Running:
    """A live server: its base URL and the app's Service (for white-box checks)."""

    url: str
    service: object

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs):
        """The official openai client pointed at this server."""
        from openai import OpenAI

        return OpenAI(base_url=self.api, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def wait(self, predicate, timeout: float = 20.0) -> None:
        """Poll the service until predicate(service) holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.service):
            assert time.monotonic() < deadline, "the server did not reach the expected state in time"
            time.sleep(0.01)


@contextlib.contextmanager
def running_server(model, **settings):
    from portable_dg.server.app import bind, build_app, uvicorn_server
    from portable_dg.server.service import ServerSettings, Service

    config = ServerSettings(**settings)
    service = Service(model, config)
    server = uvicorn_server(build_app(service), config, log_level="warning")
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", service)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()



def assert_solves(answer: str, puzzle) -> None:
    """The answer is 81 digits that keep every given and break no Sudoku rule."""
    assert len(answer) == 81 and answer.isdigit(), answer
    assert sd.rule_violations(sd.parse_puzzle(answer), puzzle) == []


def request(url: str, body: dict | bytes | None = None, headers: dict | None = None,
            method: str | None = None) -> tuple[int, dict, object]:
    """One HTTP request with the standard library: (status, headers, decoded JSON or text)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        connection.request(method or ("GET" if data is None else "POST"), parts.path, body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read().decode()
        try:
            content = json.loads(raw)
        except ValueError:
            content = raw
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content
    finally:
        connection.close()


@contextlib.contextmanager
def event_stream(url: str, body: dict, headers: dict | None = None):
    """POST and yield an iterator of SSE events (event name or None, data) as they arrive."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", parts.path, body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    assert response.status == 200, response.read()

    def events():
        name, data = None, []
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                yield name, "\n".join(data)
                name, data = None, []

    try:
        yield events()
    finally:
        connection.close()


def sse_events(url: str, body: dict, headers: dict | None = None) -> list[tuple[str | None, object]]:
    """All events of a stream, data decoded from JSON (except [DONE])."""
    with event_stream(url, body, headers) as events:
        return [(name, data if data == "[DONE]" else json.loads(data)) for name, data in events]
