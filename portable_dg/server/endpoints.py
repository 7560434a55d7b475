"""The endpoints: OpenAI's /v1/models, /v1/chat/completions and /v1/completions (with `suffix`),
llama.cpp's /infill, /edit, /health and the page, with the response shapes each answers in."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .canvas import edit_spans, infill_spans
from .generation import Finish, Generation, GenerationRequest
from .prompts import chat_prompt_ids
from .schemas import KNOBS, ApiError, ChatRequest, CompletionRequest, EditRequest, InfillRequest, parse
from .service import Service, prompt_ids_or_400, read_json

STATIC = Path(__file__).parent / "static"


async def body_of(request: Request, cls: type) -> Any:
    """The validated body of an API request (authorized, within limits, for the served model)."""
    service: Service = request.app.state.service
    service.authorize(request)
    body = parse(cls, await read_json(request, service.settings.max_body_bytes))
    service.check_model(body.model)
    return body


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
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
                        service.settings.model_name, body.usage_chunk())

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
    service: Service = request.app.state.service
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
    envelope = Envelope("cmpl", "text_completion", service.settings.model_name, body.usage_chunk())

    def choice(text: str | None, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def reply(finish: Finish) -> dict[str, Any]:
        return envelope([choice(finish.text, finish.reason)], usage=usage(finish), denoising_steps=finish.steps)

    stream = (lambda: openai_stream(service, generation, envelope, choice)) if body.stream else None
    return await service.respond(request, generation, stream, reply)


async def infill(request: Request) -> Response:
    service: Service = request.app.state.service
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
        return llama_infill_reply(service.settings.model_name, finish, generation.elapsed_ms())

    stream = (lambda: llama_stream(service, generation, reply)) if body.stream else None
    return await service.respond(request, generation, stream, reply)


async def edit(request: Request) -> Response:
    service: Service = request.app.state.service
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
    envelope = Envelope("edit", "edit", service.settings.model_name)

    def reply(finish: Finish) -> dict[str, Any]:
        segments = [{"text": text, "keep": s.keep} for text, s in zip(finish.spans, body.segments)]
        return {"id": envelope.id, "object": "edit", "created": envelope.created, "model": envelope.model,
                "text": "".join(finish.spans), "segments": segments, "usage": usage(finish),
                "denoising_steps": finish.steps}

    return await service.respond(request, generation, None, reply)


async def models(request: Request) -> Response:
    service: Service = request.app.state.service
    service.authorize(request)
    return JSONResponse({"object": "list", "data": [model_card(service)]})


async def one_model(request: Request) -> Response:
    service: Service = request.app.state.service
    service.authorize(request)
    service.check_model(request.path_params["model_id"])
    return JSONResponse(model_card(service))


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    return JSONResponse({"status": "ok", "active": service.worker.active, "in_flight": service.in_flight,
                         "max_concurrent": service.settings.max_concurrent, "max_queue": service.settings.max_queue,
                         "engine_steps": service.worker.steps})


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


# ------------------------------------------------------------------------------------ responses

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
