"""Request bodies (pydantic, strict JSON types) and the OpenAI error object.

OpenAI's own API rejects arguments it does not know; so do these models, which catches a misspelt
diffusion knob.  A few OpenAI fields a diffusion sampler has no use for are accepted and ignored
(`top_p`, `presence_penalty`, `frequency_penalty`, `user`, `metadata`, `store`); `temperature: 0`
means greedy sampling and other temperatures are ignored (the sampler's own schedule is
`t_min`/`t_max`).  Features it cannot honour (tools, logprobs, n > 1, ...) are a 400.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

KNOBS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold",
         "stability_threshold")

# field -> the values that mean "not asked for"
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
               "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}


class ApiError(Exception):
    """An error answered as OpenAI does: a status code and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class DiffusionKnobs(Strict):
    """The sampler's knobs, per request (None: the checkpoint's generation_config.json)."""

    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = None
    seed: int | None = Field(None, ge=0)

    def knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KNOBS + ("seed",)}


class JsonSchemaFormat(Strict):
    """OpenAI's response_format.json_schema."""

    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    """OpenAI's response_format: text, any JSON object, or a JSON Schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def check_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class StreamOptions(Strict):
    include_usage: bool = False
    include_drafts: bool = False


class Sampling(DiffusionKnobs):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    response_format: ResponseFormat | None = None
    grammar: str | None = None               # Lark or GBNF (llguidance's dialects)
    regex: str | None = None

    @field_validator("stop")
    @classmethod
    def check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    @model_validator(mode="after")
    def check_stream_options(self) -> "Sampling":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def check_constraint(self) -> "Sampling":
        formats = self.response_format is not None and self.response_format.type != "text"
        if formats + (self.grammar is not None) + (self.regex is not None) > 1:
            raise ValueError("give at most one of response_format (json_object/json_schema), grammar and regex")
        return self

    def constraint(self) -> dict[str, Any]:
        """The engine's constraint options of this request."""
        if self.grammar is not None:
            return {"grammar": self.grammar}
        if self.regex is not None:
            return {"regex": self.regex}
        if self.response_format is None or self.response_format.type == "text":
            return {}
        if self.response_format.type == "json_object":
            return {"json_object": True}
        return {"json_schema": self.response_format.json_schema.schema_}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def drafts(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_drafts)

    def usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else [p.model_dump() for p in self.content]
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    suffix: str | None = None


class InfillExtra(BaseModel):
    model_config = ConfigDict(extra="ignore")
    filename: str | None = None
    text: str


class InfillRequest(DiffusionKnobs):
    """llama.cpp server's /infill.  Its other options (cache_prompt, samplers, ...) are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillExtra] = []
    prompt: str = ""
    n_predict: int = -1
    seed: int | None = Field(None, ge=-1)           # llama.cpp: -1 = random
    stream: bool = False
    stop: list[str] = []


class EditSegment(Strict):
    text: str = ""
    keep: bool
    length: int | None = Field(None, ge=0)


class EditRequest(DiffusionKnobs):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    segments: list[EditSegment] = Field(min_length=1)


Body = TypeVar("Body", bound=BaseModel)


def parse(cls: type[Body], data: Any) -> Body:
    """Validate a decoded JSON body; every problem is an ApiError 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    for name, defaults in UNSUPPORTED.items():
        if name in data and data[name] not in defaults:
            raise ApiError(400, f"{name} is not supported by pdg serve", param=name, code="unsupported_parameter")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        message = error["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None
