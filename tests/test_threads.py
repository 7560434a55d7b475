"""portable_dg.threads: the default thread count leaves out the cores other work keeps busy."""

from __future__ import annotations

import os

from portable_dg import threads

STAT = """cpu  500 0 500 9000 0 0 0 0 0 0
cpu0 100 0 100 4000 0 0 0 0 0 0
cpu1 400 0 400 5000 0 0 0 0 0 0
cpu2 0 0 0 9999 0 0 0 0 0 0
intr 12345
"""


def test_cpu_times_reads_the_cores_asked_for(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    assert threads.cpu_times({0, 1}, str(stat)) == (1000, 10000)
    assert threads.cpu_times({2}, str(stat)) == (0, 9999)
    assert threads.cpu_times({0}, str(tmp_path / "missing")) is None


def test_default_threads_counts_idle_cores(monkeypatch):
    """Two usable cores: one kept busy by another process -> one thread; none busy -> two; both
    busy -> still one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    for busy_jiffies, expected in ((100, 1), (3, 2), (200, 1)):
        samples = iter([(1000, 50_000), (1000 + busy_jiffies, 50_000 + 200)])     # 100 jiffies per core
        monkeypatch.setattr(threads, "cpu_times", lambda cpus, samples=samples: next(samples))
        assert threads.default_threads() == expected
    assert threads.usable_cores() == 2
