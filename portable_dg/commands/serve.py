"""`pdg serve`: the OpenAI-compatible server (chat, completions, infill, edit, draft events, web page)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from ..errors import ConfigError
from .model_options import load_model, model_options


def served_name(model_path: str | Path) -> str:
    """The model id clients send: a directory's name, a file's stem, or a hub repo id as given."""
    path = Path(model_path)
    if path.is_dir():
        return path.resolve().name
    return path.stem if path.is_file() else str(model_path)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than loopback should come with --api-key.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on (0: a free one).")
@click.option("--api-key", envvar="PDG_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on the API (default: $PDG_API_KEY, else none).")
@click.option("--model-name", default=None, help="The model id clients send (default: the checkpoint's name).")
@click.option("--max-concurrent", type=int, default=4, show_default=True,
              help="Requests denoised together; more wait in the queue.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests waiting beyond --max-concurrent; more are answered 429 at once.")
@click.option("--max-tokens", type=int, default=4096, show_default=True,
              help="The largest max_tokens a request may ask for.")
@click.option("--max-body", "max_body_bytes", type=int, default=1 << 20, show_default=True,
              help="The largest request body in bytes.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Seconds a request may take, queueing included.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
def serve(model_path, backend, device, dtype, host, port, api_key, model_name, max_concurrent, max_queue,
          max_tokens, max_body_bytes, timeout_s, log_level):
    """Serve a model over an OpenAI-compatible HTTP API with a live web page at /."""
    try:
        from ..server.app import ServerSettings, bind, create_app, uvicorn_server
    except ImportError as e:
        raise ConfigError(f"pdg serve needs the serve extra ({e.name} is missing): "
                          "pip install 'portable-dg[serve]'") from None
    from ..sudoku import default_model_path

    settings = ServerSettings(model_name=model_name or served_name(model_path or default_model_path()),
                              api_key=api_key, max_concurrent=max_concurrent, max_queue=max_queue,
                              max_tokens=max_tokens, max_body_bytes=max_body_bytes, timeout_s=timeout_s)
    model = load_model(model_path, backend, device, dtype)
    app = create_app(model, settings)
    sock = bind(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    click.echo(f"pdg serve: {settings.model_name} ({model.backend.name}) at {url}/  "
               f"(OpenAI API: {url}/v1)", err=True)
    if not is_loopback(host) and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who reaches it can use it", err=True)
    try:
        uvicorn_server(app, settings, log_level).run(sockets=[sock])
    except KeyboardInterrupt:           # uvicorn re-raises the Ctrl-C it shut down on: a normal exit
        pass
