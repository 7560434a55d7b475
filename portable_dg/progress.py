"""Progress of long jobs (convert, quantize, imatrix, synth, eval) on stderr.

On a terminal it is a tqdm bar.  Anywhere else (a log file, a pipe, CI) it is one plain line when
the job starts, one every `interval` seconds and one when it ends, so a log shows that the job is
alive and how far it got:

    convert out.gguf: 1.21 GB of 3.79 GB (32%), 1m04s, about 2m16s left

Progress counts what the job actually does (bytes read and written, denoising steps), never
items of very different sizes.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def format_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (powers of 1000, as disk sizes are quoted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    """75 -> '1m15s'; 3725 -> '1h02m'."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`update(n)` as work is done; use as a context manager (or call `close()`).

    Args:
        total: the amount of work, in `unit`s.
        desc: what is being done, e.g. "convert out.gguf".
        unit: "B" (shown as KB/MB/GB) or a count's name ("step", "puzzle", ...).
        enabled: False makes every call a no-op (library callers that want silence).
        stream: where to write (stderr by default).
        interval: seconds between plain lines when `stream` is not a terminal.
    """

    def __init__(self, total: float, desc: str, unit: str = "B", *, enabled: bool = True,
                 stream: IO[str] | None = None, interval: float = 10.0):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream or sys.stderr
        self.interval = interval
        self.done = 0.0
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar: Any = None
        if not enabled:
            return
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=self.stream,
                            dynamic_ncols=True)
        else:
            self.line()

    def amount(self, n: float) -> str:
        return format_bytes(n) if self.unit == "B" else f"{n:.0f} {self.unit}{'s' if n != 1 else ''}"

    def line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        text = f"{self.desc}: {self.amount(self.done)}"
        if self.total:
            text += f" of {self.amount(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {format_seconds(elapsed)}"
        if final:
            text += ", done"
        elif self.total and self.done:
            text += f", about {format_seconds(elapsed * (self.total - self.done) / self.done)} left"
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_line = time.monotonic()

    def update(self, n: float = 1) -> None:
        """Record n more units of work."""
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= self.interval:
            self.line()

    def close(self) -> None:
        """End the bar, or write the final line (only when the job finished)."""
        if not self.enabled:
            return
        self.enabled = False
        if self.bar is not None:
            self.bar.close()
        elif self.total and self.done >= self.total:
            self.line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
