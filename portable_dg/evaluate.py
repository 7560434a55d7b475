"""Quality of a model (converted, quantized, another backend) against a reference model.

Teacher-forced: for a fixed seeded set of prompts, the reference generates through the engine
(`portable_dg.engine.Engine`, the sampler's own steps); every decoder call it makes, with its canvas
and its self-conditioning logits, is replayed on the model under test.  Per canvas position we compare the
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


class TeacherForcedNetwork:
    """Stands in for the reference's network in the engine: each encoder pass and decoder call
    also runs on the model under test with the same ids, canvas and self-conditioning logits, and
    the two decoders' logits are compared.  Its `condition` keeps the scaled logits themselves (the
    model under test makes its own soft embedding from them), so it runs one sequence at a time."""

    def __init__(self, reference: Any, model: Any):
        self.reference, self.model = reference.network, model.network
        self.backend, self.config = self.reference.backend, self.reference.config
        self.model_cache: Any = None
        self.kl: list[np.ndarray] = []
        self.matches: list[np.ndarray] = []

    def make_cache(self, rows: int, capacity: int) -> Any:
        self.model_cache = self.model.make_cache(rows, capacity)
        return self.reference.make_cache(rows, capacity)

    def encode(self, ids: np.ndarray, cache: Any, rows: list[int]) -> None:
        self.model_cache.lengths[:] = cache.lengths          # rows are reused and cut back alike
        self.reference.encode(ids, cache, rows)
        self.model.encode(ids, self.model_cache, rows)

    def frame(self, cache: Any, rows: list[int], T: int, decoder: bool) -> Any:
        return PairedFrame(self.reference.frame(cache, rows, T, decoder),
                           self.model.frame(self.model_cache, rows, T, decoder))

    def condition(self, scaled: Any) -> Any:
        return scaled

    def denoise(self, canvas: Any, frame: "PairedFrame", sc_logits: Any | None = None) -> Any:
        ours, theirs = self.reference, self.model
        logits = ours.denoise(canvas, frame.reference, None if sc_logits is None else ours.condition(sc_logits))
        reference = np.asarray(ours.backend.to_numpy(logits), np.float32)
        B = theirs.backend
        soft = None if sc_logits is None else theirs.condition(B.asarray(ours.backend.to_numpy(sc_logits)))
        other = B.to_numpy(theirs.denoise(B.asarray(ours.backend.to_numpy(canvas)), frame.model, soft))
        for a, b in zip(reference, np.asarray(other, np.float32)):             # per sequence [L, V]
            self.kl.append(kl_divergence(a, b))
            self.matches.append(top1_matches(a, b))
        return logits


@dataclass
class PairedFrame:
    """The reference's and the tested model's frames of one pass."""

    reference: Any
    model: Any

    @property
    def serial(self) -> int:
        return self.reference.serial


def teacher_forced(model: Any, reference: Any, prompts: list[np.ndarray], settings: EvalSettings,
                   bar: Progress) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL values and top-1 matches over every denoising step of every canvas."""
    from .engine import Engine

    L = reference.canvas_length
    network = TeacherForcedNetwork(reference, model)
    engine = Engine(reference, max_batch=1, network=network)
    sequences = []
    for i, prompt in enumerate(prompts):
        sequences.append(engine.submit(prompt, seed=settings.seed * 1_000_003 + i, eos_token_id=[],
                                       max_new_tokens=settings.canvases * L, max_denoising_steps=settings.steps,
                                       on_step=lambda info: bar.update(1)))
    engine.run()
    budget = settings.steps or reference.generation_config.max_denoising_steps
    bar.update(sum(budget * settings.canvases - sum(s.steps) for s in sequences))   # steps early stops skip
    return np.concatenate(network.kl), np.concatenate(network.matches)


def adaptive_steps(model: Any, prompts: list[np.ndarray], settings: EvalSettings, bar: Progress) -> float:
    """Mean denoising steps per canvas of the adaptive sampler over the prompts (one batch)."""
    from .engine import generate_batch

    budget = settings.steps or model.generation_config.max_denoising_steps
    outs = generate_batch(model, prompts, max_new_tokens=settings.canvases * model.canvas_length,
                          max_denoising_steps=settings.steps, seed=[settings.seed + i for i in range(len(prompts))],
                          on_step=lambda info: bar.update(1))
    steps = [n for out in outs for n in out.steps]
    bar.update(budget * settings.canvases * len(prompts) - sum(steps))     # early stops, canvases after an EOS
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
