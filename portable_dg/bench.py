"""Benchmarks measured the same way on every backend, with transformers as the reference.

One run generates `new_tokens` tokens for each of `batch` sequences (the same seeded random prompt
of `prompt_len` ids, each with its own seed) through the engine (`portable_dg.engine.Engine`): the
encoder pass over the prompts (prefill), then the denoising steps of each canvas (the whole step:
decoder pass, sampling, acceptance and the stop decision) and the commit of each block.  EOS never
ends a run, so every run does the same work.  `steps="fixed:N"` runs exactly N denoising steps per
canvas (early stop off: a stability threshold of N + 1 can never be met within N steps, on either
side); `"adaptive"` uses the checkpoint's generation config.

Metrics per run (reported as median, min and max over `repeat` runs after `warmup` runs):

    visible_tok_s           batch * new_tokens / wall time of the run (prefill and commits included)
    canvas_tok_s            batch * canvas_length * canvases / time spent denoising canvases
    steps_per_canvas        denoising steps per canvas
    time_to_first_canvas_s  prefill + the first canvas's denoising
    prefill_tok_s           prompt_len / prefill time
    ms_per_step             denoising time / denoising steps

The JSON report (`BenchReport.to_dict`, schema "portable_dg.bench/1"):

    {"schema", "model", "backend", "quant", "synthetic", "settings": {...}, "load_s",
     "metrics": {name: {"median", "min", "max"}}, "runs": [{name: value}],
     "memory": {"peak_host_bytes", "peak_device_bytes", "checkpoint_bytes", "logits_bytes",
                "bound_bytes", "within_bound"},
     "reference": <the same object for transformers, or null>,
     "ratio": {"canvas_tok_s", "visible_tok_s"} (ours / reference, or null)}

`python -m portable_dg.bench --transformers-worker MODEL SETTINGS_JSON` runs the transformers
reference (`DiffusionGemmaForBlockDiffusion.generate` with the same settings) and prints its report;
`compare_transformers` starts it as a child process so its memory is measured on its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

import numpy as np

from .config import FULL, DiffusionGemmaConfig, GenerationConfig
from .errors import ConfigError, PortableDGError
from .threads import usable_cores

SCHEMA = "portable_dg.bench/1"
METRICS = ("visible_tok_s", "canvas_tok_s", "steps_per_canvas", "time_to_first_canvas_s",
           "prefill_tok_s", "ms_per_step")
# backend -> (`pdg convert --to` target, output name) used by `--quant`
CONVERT_TARGETS = {"ggml": ("gguf", "model.gguf"), "mlx": ("mlx", "model"), "torch": ("torch", "model")}
# backend -> the factory option that takes a CPU thread count (`--threads`); torch's is process-wide
THREAD_OPTIONS = {"ggml": "n_threads"}


class BenchError(PortableDGError):
    """A benchmark could not run (a failed conversion or reference run)."""


@dataclass
class BenchSettings:
    """What one benchmark runs."""

    prompt_len: int = 64
    new_tokens: int = 256
    steps: str = "fixed:16"          # "fixed:N" or "adaptive"
    repeat: int = 3
    warmup: int = 1
    seed: int = 0
    batch: int = 1                   # sequences denoised together
    threads: int | None = None       # CPU threads of backends that take a count, and of the reference

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "repeat", "batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be positive, got {self.threads}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        self.fixed_steps  # validates the steps text

    @property
    def fixed_steps(self) -> int | None:
        """N for "fixed:N", None for "adaptive"."""
        if self.steps == "adaptive":
            return None
        kind, _, n = self.steps.partition(":")
        if kind != "fixed" or not n.isdigit() or int(n) <= 0:
            raise ConfigError(f"steps must be 'fixed:N' (N > 0) or 'adaptive', got {self.steps!r}")
        return int(n)


@dataclass
class RunTiming:
    """Wall-clock times of one generation run."""

    prefill_s: float
    canvas_s: list[float]            # denoising time of each canvas
    steps: list[int]                 # denoising steps of each canvas
    wall_s: float


def run_metrics(run: RunTiming, prompt_len: int, new_tokens: int, canvas_length: int,
                batch: int = 1) -> dict[str, float]:
    """The per-run metrics of the module docstring."""
    denoise_s = sum(run.canvas_s)
    return {
        "visible_tok_s": batch * new_tokens / run.wall_s,
        "canvas_tok_s": batch * canvas_length * len(run.canvas_s) / denoise_s,
        "steps_per_canvas": sum(run.steps) / len(run.steps),
        "time_to_first_canvas_s": run.prefill_s + run.canvas_s[0],
        "prefill_tok_s": batch * prompt_len / run.prefill_s,
        "ms_per_step": 1000.0 * denoise_s / sum(run.steps),
    }


def summarize(values: list[float]) -> dict[str, float]:
    """{"median", "min", "max"} of a non-empty list."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_runs(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric, the median/min/max over runs."""
    return {name: summarize([r[name] for r in runs]) for name in METRICS}


def seeded_prompt(vocab_size: int, length: int, seed: int) -> np.ndarray:
    """A reproducible random prompt: ids in [5, vocab) (skipping pad/eos/bos/unk/mask)."""
    return np.random.default_rng([seed, 7]).integers(5, vocab_size, size=length, dtype=np.int64)


def canvases_for(new_tokens: int, canvas_length: int) -> int:
    """Canvases needed for new_tokens (rounded up, as transformers does)."""
    return -(-new_tokens // canvas_length)


def sampler_config(base: GenerationConfig, settings: BenchSettings) -> GenerationConfig:
    """The checkpoint's generation config, with fixed steps and early stop off when asked."""
    overrides = sampler_overrides(settings)
    return base.replace(**overrides) if overrides else base


def sampler_overrides(settings: BenchSettings) -> dict[str, int]:
    """`sampler_config`'s changes as generate options."""
    n = settings.fixed_steps
    return {} if n is None else {"max_denoising_steps": n, "stability_threshold": n + 1}


# --- memory ------------------------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter of this process (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM on Linux, ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def device_peak_bytes() -> int | None:
    """Peak device memory of an accelerator runtime this process already uses (CUDA via torch,
    Metal via mlx), or None when there is none."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    mx = sys.modules.get("mlx.core")
    if mx is not None and mx.metal.is_available():
        return int(mx.get_peak_memory())
    return None


def checkpoint_bytes(path: str | Path) -> int:
    """Size of the weight files of a checkpoint (a file, or a directory's safetensors/gguf files)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".gguf"))


def memory_report(peak_host: int, peak_device: int | None, weights: int, cfg: DiffusionGemmaConfig,
                  batch: int = 1) -> dict:
    """Peak memory against the target: checkpoint size + 10% + two [batch, canvas, vocab] float32
    arrays (the sampler's bound)."""
    logits = batch * cfg.canvas_length * cfg.vocab_size * 4
    bound = int(weights * 1.1) + 2 * logits
    return {"peak_host_bytes": peak_host, "peak_device_bytes": peak_device, "checkpoint_bytes": weights,
            "logits_bytes": logits, "bound_bytes": bound,
            "within_bound": max(peak_host, peak_device or 0) <= bound}


# --- our runs --------------------------------------------------------------------------------
class EncodeTimer:
    """Times the encoder passes an engine makes (prefill and commits), waiting for the device."""

    def __init__(self, engine: Any):
        self.encode = engine.network.encode
        self.backend, self.cache = engine.backend, engine.cache
        self.total = 0.0
        engine.network = Proxy(engine.network, encode=self.timed)

    def timed(self, ids: Any, cache: Any, rows: list[int]) -> None:
        start = perf_counter()
        self.encode(ids, cache, rows)
        self.wait()
        self.total += perf_counter() - start

    def wait(self) -> None:
        """Block until the device has done the queued work (asynchronous devices), by reading one
        cached key the last encoder pass wrote."""
        self.backend.to_numpy(self.cache.keys[-1][:1, :1])


class Proxy:
    """An object's attributes, some replaced."""

    def __init__(self, target: Any, **replaced: Any):
        self.target, self.replaced = target, replaced

    def __getattr__(self, name: str) -> Any:
        return self.replaced[name] if name in self.replaced else getattr(self.target, name)


def timed_generation(model: Any, prompt: np.ndarray, settings: BenchSettings, n_canvases: int, seed: int,
                     progress: Callable[[str], None] | None = None) -> RunTiming:
    """One generation run of `settings.batch` sequences, timed at the prefill / canvas / commit
    boundaries (commits are not canvas time).  EOS is not checked, so every run does n_canvases."""
    from .engine import Engine

    L = model.canvas_length
    engine = Engine(model, max_batch=settings.batch)
    timer = EncodeTimer(engine)
    sequences = [engine.submit(prompt, seed=seed * 1_000_003 + b, eos_token_id=[], max_new_tokens=n_canvases * L,
                               **sampler_overrides(settings)) for b in range(settings.batch)]
    start = perf_counter()
    engine.admit()
    timer.wait()
    prefill = perf_counter() - start
    canvas_s, steps = [], []
    canvas_start, commits_before, steps_in_canvas = perf_counter(), timer.total, 0
    while engine.active:
        engine.step()
        steps_in_canvas += 1
        if min(len(s.blocks) for s in sequences) > len(canvas_s):          # every sequence ended this canvas
            now = perf_counter()
            canvas_s.append(now - canvas_start - (timer.total - commits_before))
            steps.append(steps_in_canvas)
            canvas_start, commits_before, steps_in_canvas = now, timer.total, 0
        if progress is not None:
            progress(f"canvas {len(canvas_s) + (steps_in_canvas > 0)}/{n_canvases} step {steps_in_canvas}")
    return RunTiming(prefill, canvas_s, steps, perf_counter() - start)


def repeated(run_once: Callable[[int, Callable[[str], None] | None], RunTiming], settings: BenchSettings,
             prompt_len: int, canvas_length: int, progress: bool) -> list[dict[str, float]]:
    """Warm-up runs (discarded), then `repeat` measured runs -> their metrics.  With `progress`,
    every step is reported on stderr (redrawn in place on a terminal, a line each otherwise)."""
    total = settings.warmup + settings.repeat
    runs = []
    for i in range(total):
        label = f"bench: {'warm-up' if i < settings.warmup else 'run'} {i + 1}/{total}"
        timing = run_once(settings.seed + i, step_reporter(label) if progress else None)
        if i >= settings.warmup:
            runs.append(run_metrics(timing, prompt_len, settings.new_tokens, canvas_length, settings.batch))
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    return runs


def step_reporter(label: str) -> Callable[[str], None]:
    """A progress callback writing `label` and the step to stderr."""
    def report(where: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r\x1b[2K{label}: {where}")
        else:
            sys.stderr.write(f"{label}: {where}\n")
        sys.stderr.flush()
    return report


@dataclass
class BenchReport:
    """One benchmark's result (see the module docstring for the JSON form)."""

    model: str
    backend: str
    quant: str | None
    synthetic: bool
    settings: dict[str, Any]
    load_s: float
    runs: list[dict[str, float]]
    memory: dict[str, Any]
    reference: dict[str, Any] | None = None
    metrics: dict[str, dict[str, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = summarize_runs(self.runs)

    @property
    def ratio(self) -> dict[str, float] | None:
        """Our median over the reference's median, for the two throughput metrics."""
        if self.reference is None:
            return None
        ref = self.reference["metrics"]
        return {name: self.metrics[name]["median"] / ref[name]["median"]
                for name in ("canvas_tok_s", "visible_tok_s")}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (schema "portable_dg.bench/1")."""
        d = asdict(self)
        return {"schema": SCHEMA, **d, "ratio": self.ratio}


def benchmark(model_path: str | Path, backend: str = "numpy", quant: str | None = None,
              settings: BenchSettings | None = None, *, compare: str | None = None,
              progress: bool = False, backend_options: dict[str, Any] | None = None) -> BenchReport:
    """Load a model (converting it first when `quant` is given) and benchmark it.

    compare: "transformers" also runs the transformers reference on `model_path` (which must then
    be a Hugging Face directory) with the same settings, in a child process."""
    settings = settings or BenchSettings()
    if compare not in (None, "transformers"):
        raise ConfigError(f"unknown reference {compare!r}; expected 'transformers'")
    reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="pdg-bench-") as scratch:
        path = convert_for(model_path, backend, quant, Path(scratch)) if quant else Path(model_path)
        report = bench_loaded(path, backend, quant, settings, progress, backend_options or {})
    report.model = str(model_path)
    if compare == "transformers":
        report.reference = compare_transformers(model_path, settings)
    return report


def thread_options(backend: str, threads: int | None) -> dict[str, Any]:
    """The backend options that give `backend` `threads` CPU threads (torch: set process-wide here;
    numpy and mlx take none: their BLAS / runtime threads are fixed when the process starts)."""
    if threads is None:
        return {}
    if backend in THREAD_OPTIONS:
        return {THREAD_OPTIONS[backend]: threads}
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        return {}
    raise ConfigError(f"--threads: the {backend} backend takes no thread count (set OPENBLAS_NUM_THREADS "
                      f"or taskset before starting instead)")


def bench_loaded(path: Path, backend: str, quant: str | None, settings: BenchSettings,
                 progress: bool, backend_options: dict[str, Any]) -> BenchReport:
    """Load `path` on `backend` and run the warm-up and measured runs."""
    from .runtime import load

    backend_options = {**thread_options(backend, settings.threads), **backend_options}
    start = perf_counter()
    model = load(path, backend=backend, **backend_options)
    load_s = perf_counter() - start
    cfg = model.config
    prompt = seeded_prompt(cfg.vocab_size, settings.prompt_len, settings.seed)
    gen = sampler_config(model.generation_config, settings)
    n_canvases = canvases_for(settings.new_tokens, cfg.canvas_length)
    runs = repeated(lambda seed, report: timed_generation(model, prompt, settings, n_canvases, seed, report),
                    settings, settings.prompt_len, cfg.canvas_length, progress)
    memory = memory_report(peak_rss_bytes(), device_peak_bytes(), checkpoint_bytes(path), cfg, settings.batch)
    return BenchReport(str(path), model.backend.name, quant, bool(model.source.metadata.get("synthetic")),
                       {**asdict(settings), "threads": getattr(model.backend, "n_threads", settings.threads),
                        "canvas_length": cfg.canvas_length,
                        "canvases": n_canvases, "max_denoising_steps": gen.max_denoising_steps},
                       load_s, runs, memory)


def convert_for(model_path: str | Path, backend: str, quant: str, scratch: Path) -> Path:
    """`pdg convert MODEL OUT --to <backend's format> --quant Q` into scratch; returns OUT."""
    if backend not in CONVERT_TARGETS:
        raise ConfigError(f"--quant needs a backend with its own format ({', '.join(CONVERT_TARGETS)}); "
                          f"for {backend!r} pass an already converted model to --model")
    target, name = CONVERT_TARGETS[backend]
    out = scratch / name
    cmd = [sys.executable, "-m", "portable_dg.cli", "convert", str(model_path), str(out),
           "--to", target, "--quant", quant]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"converting {model_path} to {target} {quant} failed: {last}")
    return out


# --- the transformers reference -------------------------------------------------------------
def compare_transformers(model_path: str | Path, settings: BenchSettings) -> dict[str, Any]:
    """Run the transformers reference in a child process with the same settings -> its report."""
    cmd = [sys.executable, "-m", "portable_dg.bench", "--transformers-worker", str(model_path),
           json.dumps(asdict(settings))]
    env = None
    if settings.threads is not None:        # the reference's BLAS and OpenMP threads, read at its start
        env = {**os.environ, **{k: str(settings.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                    "MKL_NUM_THREADS")}}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"transformers reference run on {model_path} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_reference(model_path: str, settings: BenchSettings) -> dict[str, Any]:
    """Benchmark transformers' DiffusionGemmaForBlockDiffusion.generate (float32 on CPU, bfloat16
    on CUDA), timed by hooks at the same boundaries as ours."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    reset_peak_rss()
    start = perf_counter()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_path, dtype=dtype).to(device).eval()
    load_s = perf_counter() - start
    model.generation_config.eos_token_id = None          # like ours: EOS never ends a run
    cfg = DiffusionGemmaConfig.from_file(Path(model_path) / "config.json")
    L = cfg.canvas_length
    kwargs: dict[str, Any] = {"max_new_tokens": settings.new_tokens}
    if settings.fixed_steps is not None:
        kwargs.update(max_denoising_steps=settings.fixed_steps, stability_threshold=settings.fixed_steps + 1)
    prompt = torch.tensor(np.tile(seeded_prompt(cfg.vocab_size, settings.prompt_len, settings.seed),
                                  (settings.batch, 1)), device=device)
    clock = (lambda: (torch.cuda.synchronize(), perf_counter())[1]) if cuda else perf_counter
    events: list[tuple[str, float]] = []
    model.model.encoder.register_forward_pre_hook(lambda *a: events.append(("enc", clock())))
    model.model.encoder.register_forward_hook(lambda *a: events.append(("enc_end", clock())))
    decoder = model.forward

    def counted_forward(*args: Any, **kw: Any) -> Any:
        events.append(("dec", perf_counter()))
        return decoder(*args, **kw)

    model.forward = counted_forward   # generate() calls self.forward for every denoising step

    def run_once(seed: int) -> RunTiming:
        events.clear()
        torch.manual_seed(seed)
        t0 = clock()
        with torch.no_grad():
            model.generate(prompt, **kwargs)
        return timing_from_events(events, t0, clock())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = repeated(lambda seed, report: run_once(seed), settings, settings.prompt_len, L, progress=False)
    memory = memory_report(peak_rss_bytes(), device_peak_bytes(), checkpoint_bytes(model_path), cfg,
                           settings.batch)
    return {"implementation": f"transformers {__import__('transformers').__version__}",
            "device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "load_s": load_s, "metrics": summarize_runs(runs), "runs": runs, "memory": memory}


def timing_from_events(events: list[tuple[str, float]], start: float, end: float) -> RunTiming:
    """RunTiming from encoder start/end and decoder-call events: canvas k runs from the end of
    encoder call k to the start of encoder call k + 1 (or the end of the run)."""
    enc = [t for kind, t in events if kind == "enc"]
    enc_end = [t for kind, t in events if kind == "enc_end"]
    dec = [t for kind, t in events if kind == "dec"]
    bounds = enc[1:] + [end]
    canvas_s = [b - a for a, b in zip(enc_end, bounds)]
    steps = [sum(a <= t < b for t in dec) for a, b in zip(enc_end, bounds)]
    return RunTiming(enc_end[0] - start, canvas_s, steps, end - start)


# --- the numpy matmul floor ----------------------------------------------------------------------
def step_flops(cfg: DiffusionGemmaConfig, context: int, self_conditioning: bool = True) -> float:
    """Multiply-add FLOPs (2 per MAC) of one denoising step over a canvas after `context` cached
    tokens: projections, attention, dense MLP, router, the k selected experts, the LM head and
    (with self-conditioning) the soft embedding and its MLP."""
    L, H, I, V = cfg.canvas_length, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq = cfg.num_attention_heads
    macs = L * V * H + (L * V * H + 3 * L * H * I if self_conditioning else 0)
    for g in cfg.layers:
        kv = g.num_kv_heads * g.head_dim * (2 if g.has_v_proj else 1)
        keys = (context if g.kind == FULL else min(context, cfg.sliding_window - 1)) + L
        macs += L * H * (2 * nq * g.head_dim + kv)                  # q, o, k (and v)
        macs += 2 * L * keys * nq * g.head_dim                       # scores and weighted values
        macs += 3 * L * H * I + L * H * cfg.num_experts              # dense MLP, router
        macs += 3 * L * cfg.top_k_experts * H * cfg.moe_intermediate_size
    return 2.0 * macs


def measure_sgemm(m: int = 256, k: int = 2816, n: int = 2816, seconds: float = 1.0) -> float:
    """This machine's float32 matrix-multiply rate through numpy (FLOP/s): best of repeated
    [m, k] @ [k, n] products over about `seconds`."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t = perf_counter()
        a @ b
        elapsed = perf_counter() - t
        best, spent = min(best, elapsed), spent + elapsed
    return 2.0 * m * k * n / best


def machine() -> dict[str, Any]:
    """A short description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"cpu": cpu, "cores": usable_cores(),
            "memory_bytes": memory, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "numpy": np.__version__}


# --- output ----------------------------------------------------------------------------------------
def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report dict (ours, and the reference when present)."""
    columns = [(f"{report['backend']}" + (f" {report['quant']}" if report["quant"] else ""), report)]
    if report.get("reference"):
        columns.append(("transformers", report["reference"]))
    header = f"{'metric':<24}" + "".join(f" {name:>34}" for name, _ in columns)
    lines = [header, "-" * len(header)]
    for metric in METRICS:
        cells = "".join(f" {cell(col['metrics'][metric]):>34}" for _, col in columns)
        lines.append(f"{metric:<24}{cells}")
    peak = "".join(f" {human_bytes(col['memory']['peak_host_bytes']):>34}" for _, col in columns)
    lines.append(f"{'peak_host_memory':<24}{peak}")
    if any(col["memory"]["peak_device_bytes"] for _, col in columns):
        dev = "".join(f" {human_bytes(col['memory']['peak_device_bytes'] or 0):>34}" for _, col in columns)
        lines.append(f"{'peak_device_memory':<24}{dev}")
    s = report["settings"]
    threads = f", {s['threads']} threads" if s.get("threads") else ""
    lines.append(f"settings: batch {s.get('batch', 1)}{threads}, prompt {s['prompt_len']}, new tokens "
                 f"{s['new_tokens']}, steps {s['steps']}, {s['warmup']} warm-up + {s['repeat']} runs; "
                 "median [min..max]")
    if report.get("ratio"):
        r = report["ratio"]
        lines.append(f"ratio vs transformers: canvas tok/s {r['canvas_tok_s']:.2f}x, "
                     f"visible tok/s {r['visible_tok_s']:.2f}x")
    return "\n".join(lines)


def cell(stats: dict[str, float]) -> str:
    return f"{stats['median']:.4g} [{stats['min']:.3g}..{stats['max']:.3g}]"


def human_bytes(n: float) -> str:
    """1234567890 -> '1.15 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def main(argv: list[str]) -> int:
    """Entry point of the transformers worker process."""
    if len(argv) != 3 or argv[0] != "--transformers-worker":
        print("usage: python -m portable_dg.bench --transformers-worker MODEL SETTINGS_JSON", file=sys.stderr)
        return 2
    settings = BenchSettings(**json.loads(argv[2]))
    print(json.dumps(transformers_reference(argv[1], settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
