"""`pdg chat`: an interactive chat in the terminal, with the canvas shown as it denoises.

Every turn sends the whole conversation through the chat template to one engine that lives for the
session, so a turn's prompt extends the previous turn's prompt and answer (what the engine's
prefix reuse keys on).  /reset clears the history, /system sets the system prompt, /exit leaves;
Ctrl-C stops a reply at the next denoising step.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import click

from ..errors import PortableDGError
from .model_options import load_model, model_options

HELP = "/reset clears the history, /system [TEXT] shows or sets the system prompt, /exit leaves"


@dataclass
class Reply:
    """One answered turn."""

    text: str
    tokens: int
    steps: list[int]
    seconds: float
    finish_reason: str


class ChatSession:
    """A conversation with a model: its history, system prompt and engine."""

    def __init__(self, model: Any, system: str | None = None, enable_thinking: bool = False,
                 max_tokens: int | None = None, **options: Any):
        from ..engine import Engine

        if model.tokenizer is None or not model.tokenizer.chat_template:
            raise PortableDGError(f"{model.source.path} has no chat template; pdg chat needs one")
        self.model, self.system, self.enable_thinking = model, system, enable_thinking
        self.max_tokens = max_tokens or model.generation_config.max_new_tokens
        model.generation_config.replace(max_new_tokens=self.max_tokens, **{     # bad knobs fail here, not per turn
            k: v for k, v in options.items() if k not in ("seed", "greedy")})
        self.options = options
        self.engine = Engine(model, max_batch=1, prefix_rows=1)     # each turn reuses the last one's cache
        self.history: list[dict[str, str]] = []

    def conversation(self, user_text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def prompt_ids(self, user_text: str) -> list[int]:
        """The ids of the next turn's prompt (the whole conversation, generation prompt added)."""
        from ..server.prompts import chat_prompt_ids

        return chat_prompt_ids(self.model.tokenizer, self.conversation(user_text), self.enable_thinking)

    def reply(self, user_text: str, on_step: Callable[[Any], Any] | None = None,
              on_text: Callable[[str], Any] | None = None,
              interrupted: Callable[[], bool] = lambda: False) -> Reply | None:
        """Answer one user message; on_text gets the text as canvases commit.  None when
        interrupted (the turn is then not added to the history)."""
        from ..server.prompts import TextStream

        started = time.monotonic()
        gen = self.model.generation_config
        stream = TextStream(self.model.tokenizer, gen.eos_token_id or [], self.max_tokens)

        def on_block(info: Any) -> None:
            delta = stream.push(info.ids)
            if delta and on_text is not None:
                on_text(delta)

        seq = self.engine.submit(self.prompt_ids(user_text), max_new_tokens=self.max_tokens, on_step=on_step,
                                 on_block=on_block, **self.options)
        while not seq.done:
            if interrupted():
                self.engine.cancel(seq)
                return None
            self.engine.step()
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(tail)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": stream.text}]
        return Reply(stream.text, stream.tokens, seq.output.steps, time.monotonic() - started, stream.finish_reason)

    def reset(self) -> None:
        self.history = []


class CanvasView:
    """The draft canvas under the cursor, redrawn in place after every step (on a terminal only)."""

    def __init__(self, tokenizer: Any, stream: TextIO, max_lines: int = 6):
        self.tokenizer, self.stream, self.max_lines = tokenizer, stream, max_lines
        self.live = stream.isatty()
        self.drawn = 0                      # lines currently on screen

    def __call__(self, info: Any) -> None:
        if not self.live:
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        text = self.tokenizer.decode(info.draft.tolist()).replace("\n", "⏎")
        head = (f"[canvas {info.block + 1} · step {info.step} · accepted {info.accepted} · "
                f"H {info.mean_entropy:.3f}]")
        lines = [head[:width]] + [text[i:i + width] for i in range(0, len(text), width)][:self.max_lines]
        self.clear()
        self.stream.write("\x1b[2m" + "\n".join(lines) + "\x1b[0m\n")
        self.stream.flush()
        self.drawn = len(lines)

    def clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.flush()
            self.drawn = 0


class Interrupt:
    """Ctrl-C during a reply: a flag read between denoising steps instead of an exception mid-step."""

    def __init__(self):
        self.hit = False

    def __enter__(self) -> "Interrupt":
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run_turn(session: ChatSession, text: str, show_drafts: bool) -> None:
    """Answer one message on the terminal: the live canvas on stderr, the text on stdout."""
    view = CanvasView(session.model.tokenizer, sys.stderr) if show_drafts else None

    def on_text(delta: str) -> None:
        if view is not None:
            view.clear()
        sys.stdout.write(delta)
        sys.stdout.flush()

    with Interrupt() as interrupt:
        reply = session.reply(text, on_step=view, on_text=on_text, interrupted=lambda: interrupt.hit)
    if view is not None:
        view.clear()
    if reply is None:
        click.echo("\n[stopped]", err=True)
        return
    click.echo("")
    canvases = len(reply.steps)
    click.echo(click.style(f"[{reply.tokens} tokens · {canvases} canvas{'es' if canvases != 1 else ''} · "
                           f"steps {'+'.join(map(str, reply.steps))} · {reply.seconds:.2f} s]", dim=True), err=True)


def command(session: ChatSession, line: str) -> bool:
    """Run a /command; False means leave."""
    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        click.echo("history cleared", err=True)
    elif name == "/system":
        if argument.strip():
            session.system = argument.strip()
        click.echo(f"system prompt: {session.system or '(none)'}", err=True)
    else:
        click.echo(HELP, err=True)
    return True


@click.command()
@model_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--think", is_flag=True, help="Enable the thinking mode of the chat template.")
@click.option("--max-tokens", type=int, default=None, help="Most tokens per reply (rounded up to canvases).")
@click.option("--steps", type=int, default=None, help="Maximum denoising steps per canvas.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed for noise and sampling (each turn starts from it).")
@click.option("--drafts/--no-drafts", default=True, show_default=True,
              help="Show the canvas as it denoises (on a terminal).")
def chat(model_path, backend, device, dtype, system, think, max_tokens, steps, seed, drafts):
    """Chat with a model in the terminal."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model = load_model(model_path, backend, device, dtype)
    session = ChatSession(model, system=system, enable_thinking=think, max_tokens=max_tokens,
                          max_denoising_steps=steps, seed=seed)
    click.echo(f"pdg chat: {model.source.path} ({model.backend.name}); {HELP}", err=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line):
                return
            continue
        try:
            run_turn(session, line, drafts)
        except PortableDGError as e:
            click.echo(f"error: {e}", err=True)
