"""The Starlette app behind `pdg serve` (routes in endpoints.py, shared state in service.py), and
the uvicorn server that runs it on a socket bound before serving (so port 0 works).

Every request is admitted or refused at once (429 when the running and queued requests reach
`max_concurrent + max_queue`), validated before it reaches the engine (400 with an OpenAI error
object), and holds its engine slot only while its client is there: a disconnect cancels the
sequence before the next step.
"""

from __future__ import annotations

import contextlib
import logging
import socket

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ConfigError
from ..runtime import Model
from . import endpoints
from .schemas import ApiError
from .service import ServerSettings, Service

log = logging.getLogger("portable_dg.server")


def build_app(service: Service) -> Starlette:
    """The routes over a Service; the engine thread runs for the app's lifespan."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.close()

    routes = [
        Route("/", endpoints.page), Mount("/static", StaticFiles(directory=endpoints.STATIC), name="static"),
        Route("/health", endpoints.health),
        Route("/v1/models", endpoints.models), Route("/v1/models/{model_id:path}", endpoints.one_model),
        Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"]),
        Route("/v1/completions", endpoints.completions, methods=["POST"]),
        Route("/infill", endpoints.infill, methods=["POST"]),
        Route("/edit", endpoints.edit, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.service = service
    return app


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
