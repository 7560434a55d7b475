"""Quality of a model (converted, quantized, another backend) against a reference model.

Teacher-forced: for a fixed seeded set of prompts, the reference runs the sampler's own denoising
loop (`portable_dg.sampler.denoise_canvas`); every decoder call it makes, with its canvas and its
self-conditioning logits, is replayed on the model under test.  Per canvas position we compare the
two distributions softmax(logits) (temperature 1, after soft-capping):

    kl              KL(reference || model) in nats: mean, p99 and max over all positions and steps
    top1_agreement  fraction of positions where both argmaxes agree

Free-running: both models generate from the same prompts and seed with the adaptive sampler, and
`steps_per_canvas` reports each one's mean denoising steps per canvas and the difference.

JSON form (`evaluate(...)`, schema "portable_dg.eval/1"):

    {"schema", "model", "backend", "reference", "reference_backend", "settings": {...},
     "positions": int, "kl": {"mean", "p99", "max"}, "top1_agreement": float,
     "steps_per_canvas": {"model", "reference", "delta"}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .progress import Progress

SCHEMA = "portable_dg.eval/1"
# Fields two models must share for their canvas distributions to be comparable.
COMPARABLE = ("vocab_size", "canvas_length", "hidden_size", "num_hidden_layers")


@dataclass
class EvalSettings:
    """The fixed evaluation set."""

    prompts: int = 4
    prompt_len: int = 32
    canvases: int = 1            # canvases generated per prompt
    steps: int | None = None     # max denoising steps per canvas (None: the reference's config)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts", "prompt_len", "canvases"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: [L, V] -> [L, V]."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(logits)) per row, in nats: [L, V] x 2 -> [L]."""
    log_p, log_q = log_softmax(reference), log_softmax(logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


def top1_matches(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row, whether the two argmaxes agree: [L, V] x 2 -> [L] bool."""
    return np.argmax(reference, axis=-1) == np.argmax(logits, axis=-1)


def kl_summary(values: np.ndarray) -> dict[str, float]:
    """{"mean", "p99", "max"} of per-position KL values."""
    return {"mean": float(np.mean(values)), "p99": float(np.percentile(values, 99)),
            "max": float(np.max(values))}


class TeacherForcedContext:
    """Stands in for the reference's `Context` in the sampler: each decoder call also runs on the
    model under test with the same canvas and self-conditioning, and the two are compared."""

    def __init__(self, reference_ctx: Any, model_ctx: Any):
        self.reference_ctx, self.model_ctx = reference_ctx, model_ctx
        self.model = reference_ctx.model             # the sampler reads ctx.model.backend
        self.kl: list[np.ndarray] = []
        self.matches: list[np.ndarray] = []

    def denoise_device(self, canvas: Any, self_conditioning: Any | None = None) -> Any:
        ref_backend = self.model.backend
        logits = self.reference_ctx.denoise_device(canvas, self_conditioning)
        reference = np.asarray(ref_backend.to_numpy(logits), np.float32)
        sc = None if self_conditioning is None else np.asarray(ref_backend.to_numpy(self_conditioning), np.float32)
        other = self.model_ctx.denoise(ref_backend.to_numpy(canvas).astype(np.int64), sc)
        self.kl.append(kl_divergence(reference, other))
        self.matches.append(top1_matches(reference, other))
        return logits

    def commit(self, block_ids: np.ndarray) -> None:
        self.reference_ctx.commit(block_ids)
        self.model_ctx.commit(block_ids)


def check_comparable(model: Any, reference: Any) -> None:
    """Raise ConfigError unless the two models share vocabulary, canvas length and shape."""
    for name in COMPARABLE:
        a, b = getattr(model.config, name), getattr(reference.config, name)
        if a != b:
            raise ConfigError(f"model and reference differ in {name} ({a} vs {b}); "
                              "their canvas distributions cannot be compared")


def prompts_for(settings: EvalSettings, vocab_size: int) -> list[np.ndarray]:
    """The fixed seeded prompts: ids in [5, vocab) (skipping pad/eos/bos/unk/mask)."""
    rng = np.random.default_rng([settings.seed, 11])
    return [rng.integers(5, vocab_size, size=settings.prompt_len, dtype=np.int64)
            for _ in range(settings.prompts)]


def teacher_forced(model: Any, reference: Any, prompts: list[np.ndarray], settings: EvalSettings,
                   bar: Progress) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL values and top-1 matches over every denoising step of every canvas."""
    from .sampler import default_noise, denoise_canvas

    cfg = reference.generation_config.replace(max_denoising_steps=settings.steps)
    B, L, V = reference.backend, reference.canvas_length, reference.config.vocab_size
    kl, matches = [], []
    for i, prompt in enumerate(prompts):
        ctx = TeacherForcedContext(reference.start(prompt), model.start(prompt))
        noise_rng, sample_rng = np.random.default_rng([settings.seed, i]).spawn(2)
        noise = default_noise(V, noise_rng)

        def sample(scaled: Any) -> Any:
            return B.categorical(scaled, B.asarray(sample_rng.random(L, dtype=np.float32)))

        for block in range(settings.canvases):
            committed, steps = denoise_canvas(ctx, cfg, noise(L), block, noise, sample, None,
                                              lambda info: bar.update(1))
            bar.update(cfg.max_denoising_steps - steps)          # the steps a canvas that stopped early skips
            if block + 1 < settings.canvases:
                ctx.commit(committed)
        kl.extend(ctx.kl)
        matches.extend(ctx.matches)
    return np.concatenate(kl), np.concatenate(matches)


def adaptive_steps(model: Any, prompts: list[np.ndarray], settings: EvalSettings, bar: Progress) -> float:
    """Mean denoising steps per canvas of the adaptive sampler over the prompts."""
    from .sampler import generate

    budget = settings.steps or model.generation_config.max_denoising_steps
    steps: list[int] = []
    for i, prompt in enumerate(prompts):
        out = generate(model, prompt, max_new_tokens=settings.canvases * model.canvas_length,
                       max_denoising_steps=settings.steps, seed=settings.seed + i, on_step=lambda info: bar.update(1))
        steps.extend(out.steps)
        bar.update(budget * settings.canvases - sum(out.steps))  # early stops, and canvases after an EOS
    return float(np.mean(steps))


def evaluate(model_path: str | Path, reference_path: str | Path, backend: str = "numpy",
             reference_backend: str = "numpy", settings: EvalSettings | None = None, *,
             progress: bool = False) -> dict[str, Any]:
    """Load both models and measure the model against the reference (see the module docstring);
    `progress` reports denoising steps on stderr."""
    from .runtime import load

    settings = settings or EvalSettings()
    reference = load(reference_path, backend=reference_backend)
    model = load(model_path, backend=backend)
    check_comparable(model, reference)
    prompts = prompts_for(settings, reference.config.vocab_size)
    per_pass = settings.prompts * settings.canvases
    budgets = [settings.steps or m.generation_config.max_denoising_steps for m in (reference, model, reference)]
    with Progress(per_pass * sum(budgets), "eval", "step", enabled=progress) as bar:
        kl, matches = teacher_forced(model, reference, prompts, settings, bar)
        ours, theirs = adaptive_steps(model, prompts, settings, bar), adaptive_steps(reference, prompts, settings, bar)
    return {"schema": SCHEMA, "model": str(model_path), "backend": model.backend.name,
            "reference": str(reference_path), "reference_backend": reference.backend.name,
            "settings": asdict(settings), "positions": int(kl.size), "kl": kl_summary(kl),
            "top1_agreement": float(matches.mean()),
            "steps_per_canvas": {"model": ours, "reference": theirs, "delta": ours - theirs}}


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines."""
    kl, steps = report["kl"], report["steps_per_canvas"]
    return "\n".join([
        f"model      {report['model']} ({report['backend']})",
        f"reference  {report['reference']} ({report['reference_backend']})",
        f"KL divergence (nats, {report['positions']} positions): mean {kl['mean']:.4g}, "
        f"p99 {kl['p99']:.4g}, max {kl['max']:.4g}",
        f"top-1 agreement: {100 * report['top1_agreement']:.2f}%",
        f"denoising steps per canvas (adaptive): model {steps['model']:.2f}, reference "
        f"{steps['reference']:.2f}, change {steps['delta']:+.2f}",
    ])
