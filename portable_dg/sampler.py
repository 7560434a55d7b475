"""The block-diffusion sampler (spec §4), written once against the backend protocol.

For each canvas of L tokens: start from uniform noise (or a given canvas), then up to N denoising
steps.  Each step runs the decoder, divides the logits by a temperature that falls linearly from
t_max towards t_min, samples every position, accepts the lowest-entropy positions whose summed
entropy (excluding the largest) stays under the entropy bound, re-noises the rest, and feeds the
scaled logits back as self-conditioning.  A canvas stops early when its argmax is stable and its
mean entropy is below the confidence threshold; its argmax is committed through the encoder.

Everything per step stays on the backend's device; the stop decision is the one host read per
step (plus the draft, only when an `on_step` callback asks for it).  At most one [L, V] logits
array is alive between steps (the self-conditioning input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np

from .backend import Array
from .config import GenerationConfig
from .errors import ConfigError
from .runtime import Context, Model

NoiseSource = Callable[[int], np.ndarray]          # n -> n token ids in [0, V)
SampleFunction = Callable[[Array], Array]          # scaled logits [L, V] -> ids [L] (device)


@dataclass
class StepInfo:
    """What an `on_step` callback sees after each denoising step."""

    block: int                  # canvas index, from 0
    step: int                   # denoising step within the canvas, from 1
    steps_left: int             # n of the temperature schedule (N .. 1)
    temperature: float
    draft: np.ndarray           # argmax canvas [L] after this step
    accepted: int               # positions accepted (not re-noised) this step
    mean_entropy: float
    stopped: bool               # the canvas stops after this step


@dataclass
class GenerateOutput:
    """Result of `generate`, shaped like transformers' DiffusionGemmaGenerationOutput."""

    sequences: np.ndarray       # [1, prompt + canvases * L]: prompt + whole canvases, pad after EOS
    ids: list[int]              # generated ids, cut before the first EOS
    text: str | None            # ids decoded (special tokens skipped), when there is a tokenizer
    steps: list[int]            # denoising steps used per canvas
    prompt_length: int = 0
    finished: bool = False      # an EOS was generated
    tokens_per_forward: float = field(default=0.0)


def temperature(cfg: GenerationConfig, steps_left: int) -> float:
    """t_min + (t_max - t_min) * n / N, rounded step by step in float32 as transformers does."""
    f32 = np.float32
    frac = f32(steps_left) / f32(cfg.max_denoising_steps)
    return float(f32(cfg.t_min) + f32(cfg.t_max - cfg.t_min) * frac)


def resolve_config(model: Model, overrides: Mapping[str, Any]) -> GenerationConfig:
    """The model's generation config with the call's non-None overrides applied."""
    return model.generation_config.replace(**overrides)


def new_token_budget(cfg: GenerationConfig, prompt_length: int) -> int:
    """max_new_tokens, with transformers' quirk: max_length only counts when max_new_tokens is 256."""
    if cfg.max_length and cfg.max_new_tokens == 256:
        budget = cfg.max_length - prompt_length
        if budget <= 0:
            raise ConfigError(f"max_length={cfg.max_length} leaves no room after the "
                              f"{prompt_length}-token prompt")
        return budget
    return cfg.max_new_tokens


def default_noise(vocab_size: int, rng: np.random.Generator) -> NoiseSource:
    """Uniform token ids over the whole vocabulary."""
    return lambda n: rng.integers(0, vocab_size, size=n, dtype=np.int64)


class Pins:
    """Positions of the generated text the sampler never changes (infilling / editing)."""

    def __init__(self, model: Model, pinned: Mapping[int, int] | Sequence[int] | None,
                 start_canvas: np.ndarray | None, budget: int):
        if pinned is None:
            self.tokens: dict[int, int] = {}
        elif isinstance(pinned, Mapping):
            self.tokens = {int(p): int(t) for p, t in pinned.items()}
        else:
            if start_canvas is None:
                raise ConfigError("pinned positions without token ids need start_canvas to supply them")
            self.tokens = {}
            for p in pinned:
                if not 0 <= int(p) < len(start_canvas):
                    raise ConfigError(f"pinned position {int(p)} is outside the starting canvas "
                                      f"(0..{len(start_canvas) - 1})")
                self.tokens[int(p)] = int(start_canvas[int(p)])
        for p, t in self.tokens.items():
            if not 0 <= p < budget:
                raise ConfigError(f"pinned position {p} is outside the generated range 0..{budget - 1}")
            if not 0 <= t < model.config.vocab_size:
                raise ConfigError(f"pinned token {t} at position {p} is not a valid id")

    def for_block(self, block: int, L: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(mask [L] bool, ids [L]) of this canvas's pinned positions, or None."""
        mask, ids = np.zeros(L, bool), np.zeros(L, np.int64)
        for p, t in self.tokens.items():
            if block * L <= p < (block + 1) * L:
                mask[p - block * L], ids[p - block * L] = True, t
        return (mask, ids) if mask.any() else None


def drain(steps: Generator[None, None, Any]) -> Any:
    """Run a step generator (`canvas_steps`, `sequence_steps`) to the end; return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def denoise_canvas(ctx: Context, cfg: GenerationConfig, canvas: np.ndarray, block: int,
                   noise: NoiseSource, sample: SampleFunction,
                   pins: tuple[np.ndarray, np.ndarray] | None,
                   on_step: Callable[[StepInfo], Any] | None) -> tuple[np.ndarray, int]:
    """Denoise one canvas; returns (committed argmax canvas [L], steps used)."""
    return drain(canvas_steps(ctx, cfg, canvas, block, noise, sample, pins, on_step))


def canvas_steps(ctx: Context, cfg: GenerationConfig, canvas: np.ndarray, block: int,
                 noise: NoiseSource, sample: SampleFunction,
                 pins: tuple[np.ndarray, np.ndarray] | None,
                 on_step: Callable[[StepInfo], Any] | None
                 ) -> Generator[None, None, tuple[np.ndarray, int]]:
    """`denoise_canvas` one step at a time: yields after every denoising step."""
    B = ctx.model.backend
    L = len(canvas)
    if pins is not None:
        pin_mask, pin_ids = B.asarray(pins[0]), B.asarray(pins[1])
        canvas = np.where(pins[0], pins[1], canvas)
    x = B.asarray(canvas)
    sc = None
    history = [B.asarray(np.full(L, -1, np.int64)) for _ in range(cfg.stability_threshold)]
    argmax = x
    steps = 0
    for steps_left in range(cfg.max_denoising_steps, 0, -1):
        steps += 1
        t = temperature(cfg, steps_left)
        scaled = ctx.denoise_device(x, sc) / t                         # [L, V] float32
        sc = None                                                      # free the previous logits
        argmax = B.argmax(scaled)
        sampled = sample(scaled)
        entropy = B.entropy(scaled)                                    # [L]
        if pins is not None:
            argmax = B.where(pin_mask, pin_ids, argmax)
            sampled = B.where(pin_mask, pin_ids, sampled)
            entropy = B.where(pin_mask, 0.0, entropy)
        order = B.argsort(entropy)
        sorted_entropy = entropy[order]
        keep_sorted = B.cumsum(sorted_entropy) - sorted_entropy <= cfg.entropy_bound
        accept = keep_sorted[B.argsort(order)]                         # scatter back by inverse permutation
        x = B.where(accept, sampled, B.asarray(noise(L)))
        if pins is not None:
            x = B.where(pin_mask, pin_ids, x)
        mean_entropy = B.mean(entropy)
        decision = mean_entropy < cfg.confidence_threshold              # confident ...
        for previous in history:                                       # ... and stable (never on step 1)
            decision = decision & B.all(previous == argmax)
        history = history[1:] + [argmax] if history else history
        stop = bool(B.to_numpy(decision))
        if on_step is not None:
            on_step(StepInfo(block, steps, steps_left, t, B.to_numpy(argmax).astype(np.int64),
                             int(B.to_numpy(B.sum(accept * 1, 0))), float(B.to_numpy(mean_entropy)), stop))
        if stop:
            break
        sc = scaled
        yield
    return B.to_numpy(argmax).astype(np.int64), steps


@dataclass
class BlockInfo:
    """What an `on_block` callback sees after each committed canvas."""

    block: int                  # canvas index, from 0
    ids: np.ndarray             # the committed canvas [L], pad after an EOS
    finished: bool              # an EOS is in this canvas: generation ends with it


def generate(model: Model, prompt_ids: Sequence[int] | np.ndarray, **options: Any) -> GenerateOutput:
    """Generate text after a prompt by block diffusion (transformers' `generate`, one sequence).

    Options are those of `sequence_steps`."""
    return drain(sequence_steps(model, prompt_ids, **options))


def sequence_steps(model: Model, prompt_ids: Sequence[int] | np.ndarray, *, max_new_tokens: int | None = None,
                   max_denoising_steps: int | None = None, entropy_bound: float | None = None,
                   t_min: float | None = None, t_max: float | None = None,
                   stability_threshold: int | None = None, confidence_threshold: float | None = None,
                   seed: int | None = None, noise: NoiseSource | None = None, greedy: bool = False,
                   sample: SampleFunction | None = None, start_canvas: Sequence[int] | None = None,
                   pinned: Mapping[int, int] | Sequence[int] | None = None,
                   on_step: Callable[[StepInfo], Any] | None = None,
                   on_block: Callable[[BlockInfo], Any] | None = None
                   ) -> Generator[None, None, GenerateOutput]:
    """`generate`, one denoising step per `next()`; the options are validated before the first.

    None means the checkpoint's generation config.  `noise(n)` supplies n random token ids: once
    when each canvas starts and once after every denoising step (entry j is used at position j
    when it is not accepted).  `greedy` samples the argmax of the scaled logits; `sample` replaces
    categorical sampling altogether.  `start_canvas` is the first canvas's initial ids; `pinned`
    maps generated positions (0-based) to ids the sampler never changes (or lists positions whose
    ids come from `start_canvas`).  `on_step(StepInfo)` is called after every step and
    `on_block(BlockInfo)` after every committed canvas."""
    cfg = resolve_config(model, dict(
        max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps,
        entropy_bound=entropy_bound, t_min=t_min, t_max=t_max,
        stability_threshold=stability_threshold, confidence_threshold=confidence_threshold))
    B, L, V = model.backend, model.canvas_length, model.config.vocab_size
    prompt = model.check_ids(prompt_ids, "prompt_ids")
    budget = new_token_budget(cfg, len(prompt))
    n_blocks = -(-budget // L)
    limit = model.config.max_position_embeddings
    if len(prompt) + n_blocks * L > limit:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + {n_blocks} canvas(es) of {L} exceeds the "
                          f"model's context of {limit} positions")
    first_canvas = None
    if start_canvas is not None:
        first_canvas = model.check_ids(start_canvas, "start_canvas")
        if len(first_canvas) != L:
            raise ConfigError(f"start_canvas has {len(first_canvas)} ids, expected the canvas length {L}")
    pins = Pins(model, pinned, first_canvas, n_blocks * L)
    rng = np.random.default_rng(seed)
    noise_rng, sample_rng = rng.spawn(2)
    noise = noise or default_noise(V, noise_rng)
    if sample is None:
        sample = B.argmax if greedy else (
            lambda scaled: B.categorical(scaled, B.asarray(sample_rng.random(L, dtype=np.float32))))
    eos = set(cfg.eos_token_id or [])
    return run_sequence(model, cfg, prompt, n_blocks, first_canvas, pins, noise, sample, eos, on_step, on_block)


def run_sequence(model: Model, cfg: GenerationConfig, prompt: np.ndarray, n_blocks: int,
                 first_canvas: np.ndarray | None, pins: Pins, noise: NoiseSource, sample: SampleFunction,
                 eos: set[int], on_step: Callable[[StepInfo], Any] | None,
                 on_block: Callable[[BlockInfo], Any] | None) -> Generator[None, None, GenerateOutput]:
    """The block loop of `sequence_steps` (checked arguments), yielding between denoising steps."""
    L = model.canvas_length
    ctx = model.start(prompt)
    blocks, steps = [], []
    finished = False
    for block in range(n_blocks):
        if block:
            ctx.commit(blocks[-1])
        initial = np.asarray(noise(L), np.int64)
        if block == 0 and first_canvas is not None:
            initial = first_canvas
        committed, used = yield from canvas_steps(ctx, cfg, initial, block, noise, sample,
                                                  pins.for_block(block, L), on_step)
        steps.append(used)
        eos_at = [j for j, t in enumerate(committed) if int(t) in eos]
        if eos_at:
            if cfg.pad_token_id is not None:
                committed[eos_at[0] + 1:] = cfg.pad_token_id
            finished = True
        blocks.append(committed)
        if on_block is not None:
            on_block(BlockInfo(block, committed.copy(), finished))
        if finished:
            break
        if block + 1 < n_blocks:
            yield
    generated = np.concatenate(blocks)
    ids = generated.tolist()
    cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
    valid = int((generated != cfg.pad_token_id).sum()) if cfg.pad_token_id is not None else len(ids)
    text = model.tokenizer.decode(ids[:cut]) if model.tokenizer is not None else None
    return GenerateOutput(np.concatenate([prompt, generated])[None, :], ids[:cut], text, steps,
                          len(prompt), finished, valid / max(1, sum(steps)))
