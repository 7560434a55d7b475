"""How many CPU threads to use: the cores this process may run on, less those other work keeps busy.

A thread count equal to the number of cores (llama.cpp's default) collapses when another process
holds a core: ggml's graph threads and the BLAS threads wait for each other at every barrier, and
the one sharing a core runs a fraction of the time (bench/RESULTS.md: steps 1.3 to 2 times slower
than on the idle cores alone).  `default_threads` counts the cores that were idle over a short window
instead (Linux: /proc/stat of the cores this process may use; elsewhere the load average).
"""

from __future__ import annotations

import os
import time

# Seconds /proc/stat is sampled over to see which cores other work keeps busy.
SAMPLE_SECONDS = 0.1


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_times(cpus: set[int], stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cpus` from /proc/stat, or None where there is none."""
    try:
        with open(stat) as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    busy = total = 0
    for fields in lines:
        if int(fields[0][3:]) in cpus:
            values = [int(v) for v in fields[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)        # idle + iowait
            busy, total = busy + sum(values) - idle, total + sum(values)
    return busy, total


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's cores other work kept busy over `seconds` (this process sleeps
    meanwhile); the 1-minute load average where /proc/stat is missing, 0 where both are."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(usable_cores()))
    before = cpu_times(cpus)
    if before is None:
        return min(float(usable_cores()), os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    after = cpu_times(cpus)
    total = after[1] - before[1]
    return len(cpus) * (after[0] - before[0]) / total if total > 0 else 0.0


def default_threads() -> int:
    """The usable cores other work leaves idle now (at least 1)."""
    return max(1, usable_cores() - round(busy_cores()))
