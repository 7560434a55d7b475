"""What the endpoints share: the limits, the engine worker, admission (429 at once when full) and
the two ways a generation is answered (an SSE stream, or JSON once it ends), both of which free the
request's engine slot when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

import numpy as np
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ConfigError, PortableDGError
from ..runtime import Model
from .canvas import CanvasPlan, Span, plan_canvas
from .generation import Finish, Generation, GenerationRequest
from .prompts import TokenPieces, text_prompt_ids
from .schemas import KNOBS, ApiError
from .worker import EngineWorker, Job, RequestTimeout

log = logging.getLogger("portable_dg.server")


@dataclasses.dataclass
class ServerSettings:
    """The limits and identity of a server."""

    model_name: str = "sudoku"
    api_key: str | None = None
    max_concurrent: int = 4           # sequences denoised together (the engine's batch)
    max_queue: int = 16               # requests waiting beyond those; more get 429 at once
    max_tokens: int = 4096            # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0          # a request's whole life, queueing included

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0 or not self.timeout_s > 0:
            raise ConfigError(f"max_queue must be >= 0 and timeout_s > 0, got {self.max_queue} and {self.timeout_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")


class Service:
    """What the routes share: the model, the engine worker and the admission count."""

    def __init__(self, model: Model, settings: ServerSettings):
        if model.tokenizer is None:
            raise ConfigError(f"{model.source.path} has no tokenizer; pdg serve needs one to read and write text")
        self.model, self.settings, self.tokenizer = model, settings, model.tokenizer
        self.worker = EngineWorker(model, settings.max_concurrent)
        self.pieces = TokenPieces(self.tokenizer)
        gen = model.generation_config
        self.eos = set(gen.eos_token_id or [])
        self.pad = gen.pad_token_id
        self.in_flight = 0
        self.created = int(time.time())

    # ------------------------------------------------------------------------------ admission

    async def start(self, request: GenerationRequest) -> Generation:
        """Admit (429 when full) and submit (400 for options the engine rejects)."""
        capacity = self.settings.max_concurrent + self.settings.max_queue
        if self.in_flight >= capacity:
            raise ApiError(429, f"the server is busy: {self.in_flight} requests are running or queued "
                           f"(limit {capacity}); retry later", type="rate_limit_error", code="server_busy")
        self.in_flight += 1
        job = Job(self.worker, self.settings.timeout_s, self.release)
        generation = Generation(job, request, self.tokenizer, self.eos, self.pad, self.pieces)
        try:
            await generation.start()
        except PortableDGError as e:
            message = str(e)
            raise ApiError(400, message, param=next((k for k in KNOBS if message.startswith(k)), None)) from None
        return generation

    def release(self) -> None:
        self.in_flight -= 1

    # ------------------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{self.settings.model_name}`", param="model", code="model_not_found")

    def max_tokens(self, asked: int | None, param: str) -> int:
        cap = self.settings.max_tokens
        if asked is None:
            return min(self.model.generation_config.max_new_tokens, cap)
        if asked > cap:
            raise ApiError(400, f"{param} is {asked}, more than this server allows ({cap}; pdg serve "
                           "--max-tokens)", param=param)
        return asked

    def options(self, body: Any, max_new_tokens: int, greedy: bool = False) -> dict[str, Any]:
        knobs = {k: v for k, v in body.knobs().items() if v is not None}
        if knobs.get("seed") == -1:                      # llama.cpp's "random"
            del knobs["seed"]
        constraint = body.constraint() if hasattr(body, "constraint") else {}
        return {**knobs, **constraint, "max_new_tokens": max_new_tokens, "greedy": greedy}

    def plan(self, body: Any, spans: list[Span]) -> tuple[CanvasPlan, dict[str, Any]]:
        """An infill/edit's canvas plan and engine options: one canvas, its pins and starting ids."""
        L = self.model.canvas_length
        seed = body.seed if body.seed is not None and body.seed >= 0 else None
        try:
            plan = plan_canvas(spans, L, self.model.config.vocab_size, min(self.eos) if self.eos else None,
                               self.pad, np.random.default_rng(seed))
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        return plan, {**self.options(body, L, greedy=getattr(body, "temperature", None) == 0),
                      "start_canvas": plan.start_canvas, "pinned": plan.pinned}

    def text_ids(self, text: str) -> list[int]:
        return text_prompt_ids(self.tokenizer, self.model.config.bos_token_id, text)

    # ------------------------------------------------------------------------------ running

    async def collect(self, http: Request, generation: Generation) -> Finish | None:
        """Run a generation to its end for a non-streamed answer; None if the client left first
        (its sequence is then cancelled)."""
        async def consume() -> Finish:
            finish = None
            async for kind, payload in generation.events():
                if kind == "finish":
                    finish = payload
            return finish

        task = asyncio.create_task(consume())
        gone = asyncio.create_task(wait_for_disconnect(http))
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        gone.cancel()
        try:
            return task.result()
        except RequestTimeout as e:
            raise ApiError(504, str(e), type="server_error", code="timeout") from None

    async def guarded(self, generation: Generation) -> AsyncIterator[tuple[str, Any]]:
        """generation.events(), with a failure as a final ("error", error object) event."""
        try:
            async for event in generation.events():
                yield event
        except RequestTimeout as e:
            yield "error", ApiError(504, str(e), type="server_error", code="timeout").body()
        except Exception as e:  # a failed step: the client sees an error object, the log the traceback
            log.exception("generation failed")
            yield "error", ApiError(500, f"generation failed: {e}", type="server_error").body()

    async def respond(self, http: Request, generation: Generation,
                      stream: Callable[[], AsyncIterator[ServerSentEvent]] | None,
                      reply: Callable[[Finish], dict[str, Any]]) -> Response:
        """The SSE stream when `stream` is given, else the JSON reply once the generation ends."""
        if stream is not None:
            return ClosingEventSource(stream(), on_close=generation.job.close, sep="\n", ping=15)
        finish = await self.collect(http, generation)
        return Response(status_code=499) if finish is None else JSONResponse(reply(finish))


class ClosingEventSource(EventSourceResponse):
    """An SSE response that frees its job however the connection ends (even before the first byte)."""

    def __init__(self, content: AsyncIterator[ServerSentEvent], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def prompt_ids_or_400(make: Callable[[], list[int]], param: str) -> list[int]:
    """make() (a prompt's or span's ids), its PortableDGError as a 400 naming param."""
    try:
        return make()
    except PortableDGError as e:
        raise ApiError(400, str(e), param=param) from None
