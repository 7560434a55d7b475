"""Run the standard benchmark matrix and write bench/RESULTS.md.

    .venv/bin/python bench/run_matrix.py [--modes fixed:16,adaptive] [--batches 1,4] [--threads N]
                                         [--repeat 3] [--warmup 1]

The matrix: every backend present on this machine (numpy always; ggml, mlx and torch when their
backend imports and, for quantized precisions, `pdg convert` exists) x its precisions, on the
`mini` synthetic checkpoint (released width, 2 layers, 32 experts, vocab 32768; written once into
--workdir), with fixed 16 steps (early stop off) and the adaptive sampler, at each batch size.  The
transformers reference runs with the same settings in the same process tree and is every ratio's
denominator.  Each variant runs in its own `pdg bench --json` process, so its peak memory is its
own.  `--threads N` gives every run N threads: `pdg bench --threads` for the backends that take a
count, OPENBLAS/OMP/MKL_NUM_THREADS for the rest and for the reference; pin the whole run with
`taskset` for comparable rows on a shared machine.

Also written: the numpy backend's matrix-multiply floor (FLOPs per denoising step over this
machine's measured float32 GEMM rate, against its measured time per step), and the ggml backend's
product throughput per shape, weight type and route beside the float32 and int8 reference rates
(`python -m portable_dg.backends.ggml.bench`), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from portable_dg.backends import available
from portable_dg.bench import format_table, human_bytes, machine, step_flops
from portable_dg.cli import COMMANDS
from portable_dg.config import DiffusionGemmaConfig, GenerationConfig
from portable_dg.synth import write_synthetic

HERE = Path(__file__).resolve().parent
PDG = [sys.executable, "-m", "portable_dg.cli"]
# backend -> precisions to try: (label, (`pdg convert --to` target, --quant, output suffix)); None = as is
PRECISIONS = {
    "numpy": [("f32 (bf16 weights)", None)],
    "ggml": [("Q8_0", ("gguf", "Q8_0", "Q8_0.gguf")), ("Q4_K_M", ("gguf", "Q4_K_M", "Q4_K_M.gguf")),
             ("Q4_0", ("gguf", "Q4_0", "Q4_0.gguf"))],
    "mlx": [("8-bit", ("mlx", "q8", "mlx-q8"))],
    "torch": [("bf16", None)],
}


def variants(workdir: Path, source: Path, backends: list[str], quants: list[str] | None
             ) -> list[tuple[str, str, Path]]:
    """(backend, precision label, model path) for everything asked for that this machine can
    run, converting quantized models into workdir once."""
    out = []
    for backend in backends:
        if backend not in PRECISIONS or not available(backend):
            print(f"skip {backend}: backend not available here", file=sys.stderr)
            continue
        for label, conversion in PRECISIONS[backend]:
            if conversion is not None and quants is not None and label not in quants:
                continue
            if conversion is None:
                out.append((backend, label, source))
                continue
            if "convert" not in COMMANDS:
                print(f"skip {backend} {label}: no `pdg convert` in this installation", file=sys.stderr)
                continue
            target, quant, name = conversion
            path = workdir / f"{source.name}-{name}"
            if not path.exists():
                done = subprocess.run(PDG + ["convert", str(source), str(path), "--to", target, "--quant", quant],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"skip {backend} {label}: conversion failed: {done.stderr.strip()[-300:]}",
                          file=sys.stderr)
                    continue
            out.append((backend, label, path))
    return out


def thread_env(threads: int | None) -> dict[str, str] | None:
    """The environment of a child run limited to `threads` BLAS/OpenMP threads (None: inherited)."""
    if threads is None:
        return None
    return {**os.environ, **{k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}


def run_bench(model: Path, backend: str, mode: str, batch: int, args: argparse.Namespace, compare: bool) -> dict:
    """One `pdg bench --json` process -> its report."""
    cmd = PDG + ["bench", "--model", str(model), "--backend", backend, "--steps", mode, "--batch", str(batch),
                 "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                 "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--json"]
    if compare:
        cmd += ["--compare", "transformers"]
    if args.threads is not None and backend in ("ggml", "torch"):
        cmd += ["--threads", str(args.threads)]
    print("+", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if done.returncode != 0:
        raise SystemExit(f"bench failed: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    print(format_table(report), file=sys.stderr, flush=True)
    return report


def run_eval(model: Path, backend: str, source: Path) -> dict | None:
    """Quality of a converted model against the source on numpy -> the eval report."""
    cmd = PDG + ["eval", "--model", str(model), "--backend", backend, "--reference", str(source),
                 "--prompts", "2", "--steps", "4", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"eval of {model} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


def run_products(args: argparse.Namespace) -> list[dict] | None:
    """The ggml product throughput rows (`portable_dg.backends.ggml.bench --json`), or None."""
    cmd = [sys.executable, "-m", "portable_dg.backends.ggml.bench", "--json", "--repeat", str(max(3, args.repeat))]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if done.returncode != 0:
        print(f"product throughput failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_sgemm_with(threads: int | None) -> float:
    """`measure_sgemm` in a child process with the runs' thread limit (BLAS reads it at start)."""
    code = "from portable_dg.bench import measure_sgemm; print(measure_sgemm())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=thread_env(threads),
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def ggml_build() -> str:
    """What the installed ggml was built with, as far as its CPU backend reports it."""
    import ggml

    from portable_dg.backends.ggml.engine import REPACK_BUFFER, extra_buffer_types

    flags = [f for f in ("avx2", "fma", "f16c", "avx512", "avx512_vnni", "avx_vnni", "avx512_bf16", "llamafile")
             if getattr(ggml, f"ggml_cpu_has_{f}")()]
    device = ggml.ggml_backend_dev_get(0)
    repack = REPACK_BUFFER.decode() in {b.decode() for b in extra_buffer_types(device)}
    return (f"ggml-python {ggml.__version__}: CPU backend with {', '.join(flags) or 'no SIMD flags'}; "
            f"{'a' if repack else 'no'} {REPACK_BUFFER.decode()} buffer type")


def floor_row(report: dict, config: DiffusionGemmaConfig, sgemm: float) -> dict:
    """FLOPs per step of the whole batch (averaged over the canvas: no self-conditioning on its
    first step) and the matmul floor, against the measured ms per step."""
    steps = report["metrics"]["steps_per_canvas"]["median"]
    canvases = report["settings"]["canvases"]
    prompt = report["settings"]["prompt_len"]
    per_canvas = [(step_flops(config, prompt + k * config.canvas_length, False)
                   + (steps - 1) * step_flops(config, prompt + k * config.canvas_length, True)) / steps
                  for k in range(canvases)]
    flops = report["settings"].get("batch", 1) * sum(per_canvas) / canvases
    measured = report["metrics"]["ms_per_step"]["median"]
    return {"gflop_per_step": flops / 1e9, "floor_ms": 1000 * flops / sgemm, "measured_ms": measured,
            "ratio": measured / (1000 * flops / sgemm)}


def results_markdown(info: dict, sgemm: float, rows: dict[str, list], floors: dict[str, dict],
                     quality: list, args: argparse.Namespace, config: DiffusionGemmaConfig,
                     products: list[dict] | None = None) -> str:
    """The RESULTS.md text."""
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/run_matrix.py` on {info['date']}.  Reproduce: "
        f"`.venv/bin/python bench/run_matrix.py {' '.join(sys.argv[1:])}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores available to this process; "
        f"memory {human_bytes(info['memory_bytes'] or 0)}; {info['os']}; Python {info['python']}, "
        f"numpy {info['numpy']}",
        f"- Load average when the run started: {info['load']} (this machine is shared; "
        "numbers under contention are lower and noisier than on an idle machine)",
        f"- Measured float32 GEMM rate (numpy, [256, 2816] x [2816, 2816], best of 1 s): "
        f"**{sgemm / 1e9:.1f} GFLOP/s**",
        f"- {info['ggml']}",
        f"- Threads per run: {args.threads if args.threads is not None else 'each backend’s default'}",
        "",
        "## Model",
        "",
        f"`pdg synth --like {args.like}` (random weights, bf16, {human_bytes(info['checkpoint_bytes'])}): hidden "
        f"{config.hidden_size}, {config.num_hidden_layers} layers (sliding + full, released head geometry), "
        f"{config.num_experts} experts top-{config.top_k_experts} of width {config.moe_intermediate_size}, "
        f"dense MLP {config.intermediate_size}, vocab {config.vocab_size}, canvas {config.canvas_length}.  "
        f"Prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens, "
        f"{args.warmup} warm-up + {args.repeat} measured run(s); cells are medians (min..max when "
        "more than one run).  Adaptive runs use the checkpoint's generation config (up to "
        f"{info['max_steps']} steps per canvas); random weights rarely reach its stable-and-confident "
        "stop, so the steps/canvas column shows what they used.",
        "",
    ]
    for mode, mode_rows in rows.items():
        lines += [f"## Steps: {mode}", "",
                  "| backend | precision | canvas tok/s | visible tok/s | steps/canvas "
                  "| time to first canvas (s) | prefill tok/s | ms/step | peak host memory "
                  "| within memory target | canvas tok/s vs transformers |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        reference = next((r["reference"] for _, _, r in mode_rows if r.get("reference")), None)
        for backend, label, r in mode_rows:
            lines.append(table_row(backend, label, r, reference))
        if reference:
            lines.append(table_row("transformers", f"{reference['dtype']} ({reference['implementation']}, "
                                   f"{reference['threads']} threads)", reference, None))
        lines.append("")
        if mode in floors:
            f = floors[mode]
            lines += [f"numpy matrix-multiply floor: {f['gflop_per_step']:.1f} GFLOP per step / "
                      f"{sgemm / 1e9:.1f} GFLOP/s = **{f['floor_ms']:.0f} ms**; measured "
                      f"**{f['measured_ms']:.0f} ms** per step = **{f['ratio']:.2f}x** the floor "
                      "(target: within 2x).", ""]
    if products:
        from portable_dg.backends.ggml.bench import markdown

        lines += ["## Product throughput (GFLOP/s)", "",
                  "256 rows of activations, the threads above; the ggml backend's routes per weight type "
                  "beside this machine's float32 (numpy BLAS, torch) and int8 (torch's fbgemm) rates, "
                  "measured in this run (`python -m portable_dg.backends.ggml.bench`).", "",
                  markdown(products), ""]
    if quality:
        lines += ["## Quality against the bf16 source (numpy), teacher-forced", "",
                  "| backend | precision | mean KL | p99 KL | top-1 agreement | steps/canvas change |",
                  "|---|---|---|---|---|---|"]
        for backend, label, q in quality:
            lines.append(f"| {backend} | {label} | {q['kl']['mean']:.4g} | {q['kl']['p99']:.4g} | "
                         f"{100 * q['top1_agreement']:.1f}% | {q['steps_per_canvas']['delta']:+.2f} |")
        lines.append("")
    lines += ["## Targets (reported, not asserted)", "",
              "- ggml Q8_0 and Q4_K_M >= 2.5x transformers canvas tok/s at the same fixed steps: "
              + target_ggml(rows),
              "- numpy time per step within 2x of its matmul floor: "
              + ("; ".join(f"{m}: {f['ratio']:.2f}x" for m, f in floors.items()) or "not measured"),
              "- peak memory <= checkpoint size + 10% + one canvas of float32 logits: see the table "
              "(the numpy reference widens bf16 weights to float32, so it needs about twice a bf16 "
              "checkpoint's size by design; it is the oracle, not the memory-lean path).",
              "", "Metric definitions: see `portable_dg/bench.py` and the README.", ""]
    return "\n".join(lines)


def table_row(backend: str, label: str, r: dict, reference: dict | None) -> str:
    m, mem = r["metrics"], r["memory"]

    def c(name: str, fmt: str = ".3g") -> str:
        s = m[name]
        text = format(s["median"], fmt)
        return text if s["min"] == s["max"] else f"{text} ({format(s['min'], fmt)}..{format(s['max'], fmt)})"

    ratio = (f"{m['canvas_tok_s']['median'] / reference['metrics']['canvas_tok_s']['median']:.2f}x"
             if reference else "1.00x (denominator)" if backend == "transformers" else "n/a")
    return (f"| {backend} | {label} | {c('canvas_tok_s')} | {c('visible_tok_s')} | {c('steps_per_canvas', '.0f')} "
            f"| {c('time_to_first_canvas_s')} | {c('prefill_tok_s')} | {c('ms_per_step', '.0f')} "
            f"| {human_bytes(mem['peak_host_bytes'])} | {'yes' if mem['within_bound'] else 'no'} "
            f"(bound {human_bytes(mem['bound_bytes'])}) | {ratio} |")


def target_ggml(rows: dict[str, list]) -> str:
    """The ggml Q8_0 / Q4_K_M ratios against transformers in each fixed-steps section."""
    found = []
    for mode, mode_rows in rows.items():
        if not mode.startswith("fixed"):
            continue
        reference = next((r["reference"] for _, _, r in mode_rows if r.get("reference")), None)
        for backend, label, r in mode_rows:
            if backend == "ggml" and label in ("Q8_0", "Q4_K_M") and reference:
                ratio = r["metrics"]["canvas_tok_s"]["median"] / reference["metrics"]["canvas_tok_s"]["median"]
                found.append(f"{label} ({mode}) {ratio:.2f}x ({'met' if ratio >= 2.5 else 'not met'})")
    return "; ".join(found) or "not measured (the ggml backend or its converter was not available when this ran)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "portable_dg" / "bench")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["fixed:16", "adaptive"])
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1],
                        help="Batch sizes (sequences denoised together), e.g. 1,4.")
    parser.add_argument("--threads", type=int, default=None, help="Threads of every run (see above).")
    parser.add_argument("--no-products", action="store_true", help="Skip the ggml product throughput table.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--like", choices=["mini", "tiny"], default="mini",
                        help="Synthetic preset (tiny: a quick smoke run of this script).")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=list(PRECISIONS))
    parser.add_argument("--quants", type=lambda s: s.split(","), default=None,
                        help="Converted precisions to run (labels such as Q8_0); default all.")
    parser.add_argument("--no-transformers", action="store_true", help="Skip the transformers reference.")
    args = parser.parse_args()

    source = args.workdir / f"{args.like}-bf16"
    if not source.exists():
        write_synthetic(source, args.like, dtype="bf16", progress=sys.stderr.isatty())
    config = DiffusionGemmaConfig.from_file(source / "config.json")
    info = machine()
    info.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                load=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                ggml=ggml_build() if available("ggml") else "ggml: not installed",
                checkpoint_bytes=sum(p.stat().st_size for p in source.glob("*.safetensors")),
                max_steps=GenerationConfig.from_dict(json.loads((source / "generation_config.json").read_text()))
                .max_denoising_steps)
    sgemm = measure_sgemm_with(args.threads)
    print(f"float32 GEMM rate: {sgemm / 1e9:.1f} GFLOP/s", file=sys.stderr)
    todo = variants(args.workdir, source, args.backends, args.quants)
    products = None if args.no_products or not available("ggml") else run_products(args)
    rows: dict[str, list] = {}
    floors: dict[str, dict] = {}
    for mode in args.modes:
        for batch in args.batches:
            section = f"{mode}, batch {batch}"
            rows[section] = []
            for backend, label, path in todo:
                compare = backend == "numpy" and not args.no_transformers
                report = run_bench(path, backend, mode, batch, args, compare)
                rows[section].append((backend, label, report))
                if backend == "numpy":
                    floors[section] = f = floor_row(report, config, sgemm)
                    print(f"numpy floor ({section}): {f['gflop_per_step']:.1f} GFLOP/step / {sgemm / 1e9:.1f} "
                          f"GFLOP/s = {f['floor_ms']:.0f} ms; measured {f['measured_ms']:.0f} ms "
                          f"({f['ratio']:.2f}x)", file=sys.stderr)
                # rewritten after every variant, so an interrupted matrix still leaves its results
                args.out.write_text(results_markdown(info, sgemm, rows, floors, [], args, config, products))
    quality = [(b, label, q) for b, label, path in todo if path != source
               for q in [run_eval(path, b, source)] if q is not None]
    args.out.write_text(results_markdown(info, sgemm, rows, floors, quality, args, config, products))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
