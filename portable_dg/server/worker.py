"""The engine's one thread, and what an asyncio request holds of it.

The engine is not thread-safe, so one worker thread owns it: requests hand it submissions and
cancellations, which it applies between denoising steps, and it hands each request its step, canvas
and end events back on the request's event loop (`call_soon_threadsafe`).  A cancelled request
leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable

from ..engine import Engine, Sequence
from ..runtime import Model

log = logging.getLogger("portable_dg.server")

Notify = Callable[[str, Any], None]          # (kind, payload) from the worker thread


class EngineWorker:
    """Runs `Engine.step` in its own thread while any sequence is active."""

    def __init__(self, model: Model, max_batch: int):
        # finished conversations keep their cache rows (as many as the batch) for the next turn
        self.engine = Engine(model, max_batch, prefix_rows=max_batch)
        self.inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.listeners: dict[int, tuple[Sequence, Notify]] = {}
        self.active = 0                    # sequences in the engine after the last step or command
        self.steps = 0                     # engine steps taken (each advances every running sequence)
        self.thread = threading.Thread(target=self.run, name="pdg-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop the thread after the current step; running sequences are dropped."""
        if self.thread.is_alive():
            self.inbox.put(None)
            self.thread.join()

    def submit(self, prompt_ids: list[int], options: dict[str, Any], notify: Notify
               ) -> concurrent.futures.Future[Sequence]:
        """Queue `engine.submit(prompt_ids, **options)`; the future holds the sequence or the
        ConfigError of bad options.  notify gets ("step", StepInfo), ("block", BlockInfo) when
        options ask for them through "on_step"/"on_block" = True, then ("done", GenerateOutput)
        or ("error", exception)."""
        future: concurrent.futures.Future[Sequence] = concurrent.futures.Future()

        def apply() -> None:
            if not future.set_running_or_notify_cancel():
                return
            hooks = {name: (lambda info, kind=kind: notify(kind, info))
                     for name, kind in (("on_step", "step"), ("on_block", "block")) if options.get(name)}
            try:
                seq = self.engine.submit(prompt_ids, **{**options, **hooks})
            except Exception as e:  # ConfigError for bad options; anything else is reported too
                future.set_exception(e)
                return
            self.listeners[seq.id] = seq, notify
            future.set_result(seq)

        self.inbox.put(apply)
        return future

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence before the next step (no-op when it has finished)."""
        def apply() -> None:
            if not seq.done:
                self.engine.cancel(seq)
            self.listeners.pop(seq.id, None)
        self.inbox.put(apply)

    def run(self) -> None:
        while True:
            wait = not self.engine.active              # idle: sleep until a command comes
            while True:
                try:
                    command = self.inbox.get(block=wait)
                except queue.Empty:
                    break
                if command is None:
                    return
                command()
                wait = False
            if self.engine.active:
                self.step()
            self.active = self.engine.active

    def step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as e:  # a failure of the step itself (a sequence's own callback fails only it)
            log.exception("denoising step failed")
            for seq, notify in self.listeners.values():
                self.engine.cancel(seq)
                notify("error", e)
            self.listeners.clear()
            finished = []
        self.steps += 1
        for seq in finished:
            notify = self.listeners.pop(seq.id)[1]
            notify("done", seq.output) if seq.error is None else notify("error", seq.error)


class RequestTimeout(Exception):
    """A request ran past the server's time limit."""


class Job:
    """A request's handle on one engine sequence: its events arrive on the request's event loop."""

    def __init__(self, worker: EngineWorker, timeout_s: float, release: Callable[[], None]):
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.deadline = time.monotonic() + timeout_s
        self.started = time.monotonic()
        self.release = release
        self.seq: Sequence | None = None
        self.submission: concurrent.futures.Future[Sequence] | None = None
        self.finished = False
        self.closed = False

    async def submit(self, prompt_ids: list[int], options: dict[str, Any]) -> None:
        """Hand the sequence to the engine; raises its ConfigError (and closes the job) on bad options."""
        def notify(kind: str, payload: Any) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        self.submission = self.worker.submit(prompt_ids, options, notify)
        try:
            self.seq = await asyncio.wrap_future(self.submission)
        except BaseException:
            self.close()
            raise

    async def next_event(self) -> tuple[str, Any]:
        """The next (kind, payload); RequestTimeout once the deadline passes."""
        left = self.deadline - time.monotonic()
        try:
            kind, payload = await asyncio.wait_for(self.events.get(), max(left, 0.0))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request ran past the server's limit of "
                                 f"{self.deadline - self.started:.0f} s") from None
        if kind in ("done", "error"):
            self.finished = True
        return kind, payload

    def close(self) -> None:
        """Free the engine slot (cancelling the sequence unless it finished) and the queue place."""
        if self.closed:
            return
        self.closed = True
        if self.seq is not None and not self.finished:
            self.worker.cancel(self.seq)
        elif self.seq is None and self.submission is not None and not self.submission.cancel():
            self.submission.add_done_callback(self.cancel_late)     # the worker is submitting it right now
        self.release()

    def cancel_late(self, submission: concurrent.futures.Future[Sequence]) -> None:
        if not submission.cancelled() and submission.exception() is None:
            self.worker.cancel(submission.result())
