"""The Starlette app behind `pdg serve`: OpenAI's /v1/models, /v1/chat/completions and
/v1/completions (with `suffix`), llama.cpp's /infill, an /edit endpoint, /health and the web page.

Every request is admitted or refused at once (429 when the running and queued requests reach
`max_concurrent + max_queue`), validated before it reaches the engine (400 with an OpenAI error
object), and holds its engine slot only while its client is there: a disconnect cancels the
sequence before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ConfigError, PortableDGError
from ..runtime import Model
from .canvas import CanvasPlan, Span, edit_spans, infill_spans, plan_canvas
from .generation import Finish, Generation, GenerationRequest
from .prompts import TokenPieces, chat_prompt_ids, text_prompt_ids
from .schemas import (KNOBS, ApiError, ChatRequest, CompletionRequest, EditRequest, InfillRequest, parse)
from .worker import EngineWorker, Job, RequestTimeout

log = logging.getLogger("portable_dg.server")
STATIC = Path(__file__).parent / "static"


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
        return {**knobs, "max_new_tokens": max_new_tokens, "greedy": greedy}

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


def usage(finish: Finish) -> dict[str, int]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


class Envelope:
    """The fields every response and chunk of one request shares."""

    def __init__(self, prefix: str, obj: str, model: str, include_usage: bool = False):
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.object, self.model, self.include_usage = obj, model, include_usage
        self.created = int(time.time())

    def __call__(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return {**body, **extra}


def sse(body: dict[str, Any] | str, event: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=body if isinstance(body, str) else json.dumps(body, ensure_ascii=False),
                           event=event)


async def openai_stream(service: Service, generation: Generation, envelope: Envelope,
                        choice: Callable[[str | None, str | None], dict[str, Any]],
                        first: dict[str, Any] | None = None) -> AsyncIterator[ServerSentEvent]:
    """The SSE body of a streamed chat or text completion: `first` (the chat's role chunk), drafts
    as `event: draft` chunks with no choices, text chunks, the finish chunk, usage, [DONE]."""
    if first is not None:
        yield sse(envelope([first]))
    async for kind, payload in service.guarded(generation):
        if kind == "draft":
            yield sse(envelope([], draft=payload), event="draft")
        elif kind == "text":
            yield sse(envelope([choice(payload, None)]))
        elif kind == "finish":
            yield sse(envelope([choice(None, payload.reason)]))
            if envelope.include_usage:
                yield sse({**envelope([]), "usage": usage(payload)})
        else:
            yield sse(payload)
    yield sse("[DONE]")


# ---------------------------------------------------------------------------------- endpoints

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
    try:
        return make()
    except PortableDGError as e:
        raise ApiError(400, str(e), param=param) from None


def build_app(service: Service) -> Starlette:
    """The routes over a Service."""
    settings = service.settings

    async def body_of(request: Request, cls: type) -> Any:
        service.authorize(request)
        body = parse(cls, await read_json(request, settings.max_body_bytes))
        service.check_model(body.model)
        return body

    async def chat_completions(request: Request) -> Response:
        body: ChatRequest = await body_of(request, ChatRequest)
        if not service.tokenizer.chat_template:
            raise ApiError(400, "this checkpoint has no chat template; use /v1/completions", param="messages")
        ids = prompt_ids_or_400(lambda: chat_prompt_ids(service.tokenizer, [m.as_dict() for m in body.messages]),
                                "messages")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = service.max_tokens(body.max_completion_tokens or body.max_tokens, param)
        generation = await service.start(GenerationRequest(
            ids, service.options(body, max_tokens, greedy=body.temperature == 0), max_tokens, body.stop_list(),
            drafts=body.drafts()))
        envelope = Envelope("chatcmpl", "chat.completion.chunk" if body.stream else "chat.completion",
                            settings.model_name, body.usage_chunk())

        def choice(text: str | None, finish_reason: str | None) -> dict[str, Any]:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish_reason}

        def reply(finish: Finish) -> dict[str, Any]:
            message = {"role": "assistant", "content": finish.text, "refusal": None}
            return envelope([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish.reason}],
                            usage=usage(finish), denoising_steps=finish.steps)

        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        stream = (lambda: openai_stream(service, generation, envelope, choice, first)) if body.stream else None
        return await service.respond(request, generation, stream, reply)

    async def completions(request: Request) -> Response:
        body: CompletionRequest = await body_of(request, CompletionRequest)
        ids = completion_prompt(service, body)
        if body.suffix is None:
            max_tokens = service.max_tokens(body.max_tokens, "max_tokens")
            gen_request = GenerationRequest(ids, service.options(body, max_tokens, greedy=body.temperature == 0),
                                            max_tokens, body.stop_list(), drafts=body.drafts())
        else:
            if body.max_tokens is not None:
                service.max_tokens(body.max_tokens, "max_tokens")
            spans = prompt_ids_or_400(lambda: infill_spans(service.tokenizer, body.suffix, body.max_tokens,
                                                           service.model.canvas_length), "suffix")
            plan, options = service.plan(body, spans)
            gen_request = GenerationRequest(ids, options, service.model.canvas_length, body.stop_list(), plan=plan,
                                            drafts=body.drafts())
        generation = await service.start(gen_request)
        envelope = Envelope("cmpl", "text_completion", settings.model_name, body.usage_chunk())

        def choice(text: str | None, finish_reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        def reply(finish: Finish) -> dict[str, Any]:
            return envelope([choice(finish.text, finish.reason)], usage=usage(finish), denoising_steps=finish.steps)

        stream = (lambda: openai_stream(service, generation, envelope, choice)) if body.stream else None
        return await service.respond(request, generation, stream, reply)

    async def infill(request: Request) -> Response:
        body: InfillRequest = await body_of(request, InfillRequest)
        context = "".join(f"{extra.text}\n" for extra in body.input_extra) + body.input_prefix + body.prompt
        ids = prompt_ids_or_400(lambda: service.text_ids(context), "input_prefix")
        gap = body.n_predict if body.n_predict > 0 else None
        if gap is not None:
            service.max_tokens(gap, "n_predict")
        spans = prompt_ids_or_400(lambda: infill_spans(service.tokenizer, body.input_suffix, gap,
                                                       service.model.canvas_length), "input_suffix")
        plan, options = service.plan(body, spans)
        generation = await service.start(GenerationRequest(ids, options, service.model.canvas_length, body.stop,
                                                           plan=plan))

        def reply(finish: Finish) -> dict[str, Any]:
            return llama_infill_reply(settings.model_name, finish, generation.elapsed_ms())

        stream = (lambda: llama_stream(service, generation, reply)) if body.stream else None
        return await service.respond(request, generation, stream, reply)

    async def edit(request: Request) -> Response:
        body: EditRequest = await body_of(request, EditRequest)
        if body.prompt is not None and body.messages is not None:
            raise ApiError(400, "give the context as prompt or as messages, not both", param="messages")
        if body.messages is not None:
            ids = prompt_ids_or_400(lambda: chat_prompt_ids(service.tokenizer, [m.as_dict() for m in body.messages]),
                                    "messages")
        else:
            ids = prompt_ids_or_400(lambda: service.text_ids(body.prompt or ""), "prompt")
        spans = prompt_ids_or_400(lambda: edit_spans(service.tokenizer, [(s.text, s.keep, s.length)
                                                                         for s in body.segments]), "segments")
        plan, options = service.plan(body, spans)
        generation = await service.start(GenerationRequest(ids, options, service.model.canvas_length, plan=plan))
        envelope = Envelope("edit", "edit", settings.model_name)

        def reply(finish: Finish) -> dict[str, Any]:
            segments = [{"text": text, "keep": s.keep} for text, s in zip(finish.spans, body.segments)]
            return {"id": envelope.id, "object": "edit", "created": envelope.created, "model": envelope.model,
                    "text": "".join(finish.spans), "segments": segments, "usage": usage(finish),
                    "denoising_steps": finish.steps}

        return await service.respond(request, generation, None, reply)

    async def models(request: Request) -> Response:
        service.authorize(request)
        return JSONResponse({"object": "list", "data": [model_card(service)]})

    async def one_model(request: Request) -> Response:
        service.authorize(request)
        service.check_model(request.path_params["model_id"])
        return JSONResponse(model_card(service))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **service.worker.counts, "in_flight": service.in_flight,
                             "max_concurrent": settings.max_concurrent, "max_queue": settings.max_queue,
                             "engine_steps": service.worker.steps})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.close()

    routes = [
        Route("/", page), Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/health", health),
        Route("/v1/models", models), Route("/v1/models/{model_id:path}", one_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/infill", infill, methods=["POST"]),
        Route("/edit", edit, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def completion_prompt(service: Service, body: CompletionRequest) -> list[int]:
    """/v1/completions' prompt: text (BOS added), one text in a list, or token ids."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt_ids_or_400(lambda: service.text_ids(prompt), "prompt")
    return prompt_ids_or_400(lambda: service.model.check_ids(prompt, "prompt").tolist(), "prompt")


def model_card(service: Service) -> dict[str, Any]:
    """/v1/models' entry, with what the web page needs to know about the canvas and defaults."""
    model, gen = service.model, service.model.generation_config
    return {"id": service.settings.model_name, "object": "model", "created": service.created,
            "owned_by": "portable_dg", "canvas_length": model.canvas_length,
            "context_length": model.config.max_position_embeddings, "backend": model.backend.name,
            "chat_template": bool(service.tokenizer.chat_template), "max_tokens": service.settings.max_tokens,
            "defaults": {"max_tokens": min(gen.max_new_tokens, service.settings.max_tokens),
                         **{k: getattr(gen, k) for k in KNOBS}}}


def llama_infill_reply(model_name: str, finish: Finish, elapsed_ms: float) -> dict[str, Any]:
    """llama.cpp's /infill answer (the fields editor plugins read)."""
    return {"index": 0, "content": finish.text, "stop": True, "model": model_name,
            "tokens_predicted": finish.completion_tokens, "tokens_evaluated": finish.prompt_tokens,
            "stop_type": "eos", "stopping_word": "", "truncated": False,
            "timings": {"prompt_n": finish.prompt_tokens, "predicted_n": finish.completion_tokens,
                        "predicted_ms": elapsed_ms},
            "denoising_steps": finish.steps}


async def llama_stream(service: Service, generation: Generation,
                       reply: Callable[[Finish], dict[str, Any]]) -> AsyncIterator[ServerSentEvent]:
    """llama.cpp's streamed /infill: {"content", "stop": false} chunks, then the full answer."""
    async for kind, payload in service.guarded(generation):
        if kind == "text":
            yield sse({"index": 0, "content": payload, "stop": False})
        elif kind == "finish":
            yield sse({**reply(payload), "content": ""})
        elif kind == "error":
            yield sse(payload)


async def api_error(request: Request, exc: ApiError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.status == 429:
        headers["Retry-After"] = "1"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    return JSONResponse(ApiError(500, f"internal error: {exc}", type="server_error").body(), status_code=500)


def create_app(model: Model, settings: ServerSettings | None = None) -> Starlette:
    """The ASGI app serving `model`; the engine thread starts with the app's lifespan."""
    return build_app(Service(model, settings or ServerSettings()))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the real port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def uvicorn_server(app: Starlette, settings: ServerSettings, log_level: str = "info"):
    """A uvicorn.Server for the app; run it with `.run(sockets=[bind(host, port)])`."""
    import uvicorn

    capacity = settings.max_concurrent + settings.max_queue
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            limit_concurrency=4 * capacity + 32)
    return uvicorn.Server(config)
