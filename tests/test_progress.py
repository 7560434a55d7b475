"""Progress on stderr: plain lines off a terminal (logs, CI), nothing when disabled."""

from __future__ import annotations

import io

from portable_dg.progress import Progress, format_bytes, format_seconds


def test_formats():
    assert format_bytes(3.79e9) == "3.79 GB" and format_bytes(512) == "512 B" and format_bytes(2.5e13) == "25 TB"
    assert format_seconds(75) == "1m15s" and format_seconds(3725) == "1h02m" and format_seconds(4) == "4s"


def test_plain_lines_off_a_terminal():
    stream = io.StringIO()
    with Progress(3e9, "convert out.gguf", stream=stream, interval=0) as bar:
        bar.update(1e9)
        bar.update(2e9)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("convert out.gguf: 0 B of 3 GB (0%), 0s")
    assert lines[1].startswith("convert out.gguf: 1 GB of 3 GB (33%), 0s, about 0s left")
    assert lines[-1] == "convert out.gguf: 3 GB of 3 GB (100%), 0s, done"


def test_lines_are_spaced_by_the_interval():
    stream = io.StringIO()
    with Progress(100, "eval", "step", stream=stream, interval=3600) as bar:
        for _ in range(100):
            bar.update(1)
    assert stream.getvalue().splitlines() == ["eval: 0 steps of 100 steps (0%), 0s",
                                              "eval: 100 steps of 100 steps (100%), 0s, done"]


def test_disabled_and_unfinished():
    stream = io.StringIO()
    with Progress(10, "quiet", stream=stream, enabled=False) as bar:
        bar.update(10)
    assert stream.getvalue() == ""
    with Progress(10, "failed", "step", stream=stream, interval=3600) as bar:
        bar.update(4)
    assert stream.getvalue().splitlines() == ["failed: 0 steps of 10 steps (0%), 0s"]     # no "done" line
