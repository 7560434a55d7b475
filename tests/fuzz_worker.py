"""Loads fuzzer mutants for tests/test_fuzz.py, each in a forked child with a memory limit and a timeout.

Run as a script, it imports portable_dg once, then reads one request per stdin line,
`{"kind": "gguf" | "safetensors", "path": ..., "timeout": seconds}`, forks a child that loads the
file (with its address space limited), and writes one JSON line per request:

    {"status": "loaded" | "error" | "crash" | "hang", "detail": "..."}

"error" is the project's one-line error (a PortableDGError whose message is one line); "crash" is
any other exception, a multi-line message, or death by a signal; "hang" is a child still running
after the timeout (then killed).  The kinds "raise", "sleep" and "allocate" check the harness
itself.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time
import traceback

import numpy as np

from portable_dg.errors import PortableDGError

HEADROOM = 1 << 30          # address space a child may add to what the worker already maps


def load_gguf(path: str) -> None:
    """What `pdg info` and `portable_dg.load` do with a GGUF file, every tensor touched."""
    from portable_dg.converters.gguf import describe_gguf, read_gguf

    describe_gguf(path)
    source = read_gguf(path)
    for value in source.tensors.values():
        np.asarray(value.dequantize() if hasattr(value, "dequantize") else value).sum()
    if source.tokenizer is not None:
        source.tokenizer.decode(source.tokenizer.encode("fuzz <bos> text"))


def load_safetensors(path: str) -> None:
    """Reading a checkpoint directory whose weights file is the mutant, every tensor loaded."""
    from portable_dg.source import open_source

    source = open_source(os.path.dirname(path))
    for name in source.tensors:
        np.asarray(source.tensors[name]).sum()


def raise_error(path: str) -> None:
    raise RuntimeError(f"deliberate failure on {path}")


LOADERS = {"gguf": load_gguf, "safetensors": load_safetensors, "raise": raise_error,
           "sleep": lambda path: time.sleep(3600), "allocate": lambda path: np.ones(1 << 40, np.uint8)}


def child(kind: str, path: str, limit: int | None, out: int) -> None:
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        LOADERS[kind](path)
        result = {"status": "loaded", "detail": ""}
    except PortableDGError as e:
        message = str(e)
        one_line = message and "\n" not in message
        result = {"status": "error" if one_line else "crash", "detail": message}
    except BaseException as e:  # noqa: BLE001 - every other way out is what the fuzzer looks for
        result = {"status": "crash", "detail": "".join(traceback.format_exception_only(type(e), e)).strip()
                  + " | " + traceback.format_tb(e.__traceback__)[-1].strip().replace("\n", " ")}
    os.write(out, json.dumps(result).encode())
    os._exit(0)


def address_space_limit() -> int | None:
    """The worker's mapped size plus HEADROOM (Linux; None elsewhere, where RLIMIT_AS is not kept)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") + HEADROOM


def run(kind: str, path: str, limit: int | None, timeout: float) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        child(kind, path, limit, write)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return {"status": "hang", "detail": f"still running after {timeout} s"}
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}"
    return {"status": "crash", "detail": f"the child died ({how})"}


def main() -> None:
    import portable_dg.converters.gguf  # noqa: F401  (imported once, before any fork)
    import portable_dg.source  # noqa: F401
    import tokenizers  # noqa: F401

    limit = address_space_limit()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.write(json.dumps(run(request["kind"], request["path"], limit, request["timeout"])) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
