"""Measure `pdg serve` under concurrent clients and write bench/SERVE.md.

    .venv/bin/python bench/serve_bench.py [--models sudoku,mini] [--clients 1,4,8] [--repeat 3] [--write]

For each model, the server runs as a child process (`pdg serve --max-concurrent 8`) so its memory
is its own.  Each round starts C client threads that each send R streamed chat requests one after
another, asking for draft events; per request the client records the time to the first draft event
(the canvas after the first denoising step, prefill included) and to the first committed text, and
the round gives completed requests per minute.  The same prompts also run with plain
`portable_dg.generate` calls one after another in a child process (no server, no HTTP) for the
sequential baseline.  Peak memory is the server's VmHWM after the 8-client round, against its RSS
once the model is loaded.

Models: `sudoku` is the bundled model (adaptive steps, one 81-token canvas per answer); `mini` is
`pdg synth --like mini` (released width, 2 layers, vocab 32768, canvas 256; random weights, so the
early stop never fires: every canvas takes --mini-steps steps).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from portable_dg import sudoku as sd
from portable_dg.bench import human_bytes, machine

HERE = Path(__file__).resolve().parent
PDG = [sys.executable, "-m", "portable_dg.cli"]
CHILD_ENV = dict(os.environ)          # --blas-threads sets the BLAS thread count of the measured processes


def workload(name: str, workdir: Path, mini_steps: int) -> tuple[Path, list[str], dict]:
    """(model path, user messages, extra request fields) of a model."""
    if name == "sudoku":
        return sd.default_model_path(), [sd.grid_text(p) for p, _ in sd.test_set(64)], {}
    path = workdir / "mini"
    if not path.exists():
        subprocess.run(PDG + ["synth", str(path), "--like", "mini"], check=True, capture_output=True)
    prompts = [f"Write a short story about robot number {i}." for i in range(64)]
    return path, prompts, {"max_tokens": 256, "max_denoising_steps": mini_steps}


class Server:
    """`pdg serve` in a child process on a free port."""

    def __init__(self, model: Path, max_concurrent: int, backend: str):
        self.child = subprocess.Popen(PDG + ["serve", "--model", str(model), "--backend", backend, "--port", "0",
                                             "--max-concurrent",
                                             str(max_concurrent), "--max-queue", "64", "--timeout", "3600",
                                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                                      env=CHILD_ENV)
        line = self.child.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            raise SystemExit(f"pdg serve did not start: {line}{self.child.stderr.read()}")
        self.port = int(match.group(1))
        while True:
            try:
                if self.get("/health")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.05)

    def get(self, path: str) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("GET", path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server process, in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.child.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def stop(self) -> None:
        self.child.terminate()
        self.child.wait(timeout=60)


def streamed_request(port: int, message: str, extra: dict, seed: int) -> dict[str, float]:
    """One streamed chat request with drafts: seconds to the first draft, first text and the end."""
    body = {"messages": [{"role": "user", "content": message}], "stream": True, "seed": seed,
            "stream_options": {"include_drafts": True}, **extra}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    started = time.perf_counter()
    first_draft = first_text = None
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        event = None
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
                now = time.perf_counter() - started
                if event == "draft" and first_draft is None:
                    first_draft = now
                elif data != "[DONE]" and first_text is None and event is None:
                    choices = json.loads(data)["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first_text = now
                event = None
    finally:
        connection.close()
    return {"first_draft": first_draft, "first_text": first_text, "total": time.perf_counter() - started}


def round_of(server: Server, clients: int, per_client: int, prompts: list[str], extra: dict,
             sample_memory: bool) -> dict:
    """C clients x R requests each; requests/min, per-request timings and the peak RSS seen."""
    results: list[dict] = []
    peak = {"rss": 0}
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            timing = streamed_request(server.port, prompts[(c * per_client + r) % len(prompts)], extra, seed=r)
            with lock:
                results.append(timing)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if sample_memory:
            peak["rss"] = max(peak["rss"], server.memory()["VmRSS"])
        time.sleep(0.05)
    wall = time.perf_counter() - started
    return {"requests_per_min": 60 * len(results) / wall, "wall_s": wall, "timings": results,
            "peak_rss": peak["rss"]}


DIRECT = """
import json, sys, time, portable_dg
from portable_dg.server.prompts import chat_prompt_ids
model = portable_dg.load(sys.argv[1], backend=sys.argv[5])
prompts, extra, n = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
options = {"max_new_tokens": extra.get("max_tokens"), "max_denoising_steps": extra.get("max_denoising_steps")}
ids = [chat_prompt_ids(model.tokenizer, [{"role": "user", "content": p}]) for p in prompts[:n]]
portable_dg.generate(model, ids[0], seed=0, **options)                     # warm-up
started = time.perf_counter()
for i, prompt in enumerate(ids):
    portable_dg.generate(model, prompt, seed=i, **options)
print(json.dumps({"requests_per_min": 60 * n / (time.perf_counter() - started)}))
"""


def direct_baseline(model: Path, prompts: list[str], extra: dict, n: int, backend: str) -> float:
    """Requests per minute of plain `generate` calls one after another (a child process)."""
    out = subprocess.run([sys.executable, "-c", DIRECT, str(model), json.dumps(prompts), json.dumps(extra), str(n),
                          backend],
                         check=True, capture_output=True, text=True, env=CHILD_ENV)
    return json.loads(out.stdout.splitlines()[-1])["requests_per_min"]


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}g}"
    return f"{median:.{digits}g} [{min(values):.{digits}g}..{max(values):.{digits}g}]"


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    model, prompts, extra = workload(name, workdir, args.mini_steps)
    per_client = args.sudoku_requests if name == "sudoku" else args.mini_requests
    repeat = args.repeat if name == "sudoku" else args.mini_repeat
    print(f"{name}: direct baseline", file=sys.stderr)
    direct = [direct_baseline(model, prompts, extra, per_client * max(args.clients) // 2, args.backend)
              for _ in range(repeat)]
    server = Server(model, max(args.clients), args.backend)
    rows = [f"| {name} | sequential `generate`, no server | 1 | {spread(direct)} | – | – | – |"]
    memory_line = ""
    try:
        loaded = server.memory()["VmRSS"]
        streamed_request(server.port, prompts[0], extra, seed=0)             # warm-up
        for clients in args.clients:
            rounds = []
            for _ in range(repeat):
                print(f"{name}: {clients} client(s)", file=sys.stderr)
                rounds.append(round_of(server, clients, per_client, prompts, extra, clients == max(args.clients)))
            timings = [t for r in rounds for t in r["timings"]]
            rows.append(f"| {name} | pdg serve, streamed with drafts | {clients} | "
                        f"{spread([r['requests_per_min'] for r in rounds])} | "
                        f"{spread([t['first_draft'] for t in timings], 1000)} | "
                        f"{spread([t['first_text'] for t in timings], 1000)} | "
                        f"{spread([t['total'] for t in timings], 1000)} |")
            if clients == max(args.clients):
                peak = max(r["peak_rss"] for r in rounds)
                memory_line = (f"- {name}: server RSS after loading {human_bytes(loaded)}; peak RSS sampled during "
                               f"{clients} concurrent requests {human_bytes(peak)} (+{human_bytes(peak - loaded)}); "
                               f"process peak (VmHWM) {human_bytes(server.memory()['VmHWM'])}")
    finally:
        server.stop()
    return rows + [memory_line]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sudoku,mini")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per client count (sudoku)")
    parser.add_argument("--mini-repeat", type=int, default=1, help="rounds per client count (mini)")
    parser.add_argument("--sudoku-requests", type=int, default=8, help="requests per client (sudoku)")
    parser.add_argument("--mini-requests", type=int, default=1, help="requests per client (mini)")
    parser.add_argument("--mini-steps", type=int, default=4, help="denoising steps per mini canvas")
    parser.add_argument("--workdir", type=Path, default=None, help="where the mini checkpoint is written once")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="OPENBLAS/OMP thread count of the server and baseline processes (default: inherited)")
    parser.add_argument("--backend", default="numpy", help="backend of the server and the baseline")
    parser.add_argument("--write", action="store_true", help="write bench/SERVE.md")
    args = parser.parse_args(argv)
    if args.blas_threads is not None:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            CHILD_ENV[name] = str(args.blas_threads)
    args.clients = [int(c) for c in args.clients.split(",")]
    workdir = args.workdir or Path(tempfile.gettempdir()) / "pdg-serve-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    rows, memory, start_load = [], [], os.getloadavg()[0]
    for name in args.models.split(","):
        *model_rows, memory_line = bench_model(name, args, workdir)
        rows += model_rows
        memory.append(memory_line)
    info = machine()
    lines = [
        "# pdg serve under concurrent clients",
        "",
        f"Written by `bench/serve_bench.py {' '.join(argv)}` on {datetime.now(timezone.utc):%Y-%m-%d}: "
        f"{info['cpu']}, {info['cores']} cores, {human_bytes(info['memory_bytes'] or 0)}, {info['os']}, "
        f"Python {info['python']}, numpy {info['numpy']}, {args.backend} backend; load average "
        f"{start_load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end.",
        "",
        "Cells are median [min..max] over all requests (timings) or rounds (requests/min).  Time to first "
        "draft includes the prefill; time to first text is when the first canvas committed.",
        "",
        "| model | how | clients | requests/min | first draft (ms) | first text (ms) | request (ms) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Memory:",
        "",
        *memory,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        (HERE / "SERVE.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
