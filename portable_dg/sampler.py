"""The block-diffusion sampler (spec §4), written once against the backend protocol.

For each canvas of L tokens: start from uniform noise (or a given canvas), then up to N denoising
steps.  Each step runs the decoder, divides the logits by a temperature that falls linearly from
t_max towards t_min, samples every position, accepts the lowest-entropy positions whose summed
entropy (excluding the largest) stays under the entropy bound, re-noises the rest, and feeds the
scaled logits back as self-conditioning.  A canvas stops early when its argmax is stable and its
mean entropy is below the confidence threshold; its argmax is committed through the encoder.

`denoise_step` is one step of a whole batch, each row with its own knobs, schedule, seed, pins and
stop: a pure function of device arrays, which a backend may compile or capture.  Its random numbers
come from a counter-based generator computed on the device (a hash of the row's seed, canvas, step
and position), so a seed gives the same noise on every backend and whatever else is in the batch.
The engine (`portable_dg.engine`) schedules sequences, encodes prompts and committed canvases, and
reads each step's result back once.  Between steps a row keeps its canvas, its self-conditioning
soft embedding [L, H] and its argmax history; no [L, V] array outlives a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backend import Array
from .config import GenerationConfig
from .errors import ConfigError

NoiseSource = Callable[[int], np.ndarray]          # n -> n token ids in [0, V)

M32 = 0xFFFF_FFFF
# Streams of the counter-based generator: each random quantity hashes its own stream id.
INITIAL, UNIFORM, RENOISE, INITIAL_UNIFORM = 1, 2, 3, 4


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
class BlockInfo:
    """What an `on_block` callback sees after each committed canvas."""

    block: int                  # canvas index, from 0
    ids: np.ndarray             # the committed canvas [L], pad after an EOS
    finished: bool              # generation ends with this canvas (an EOS, or the budget is spent)


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
    completed: bool | None = None   # with a constraint: the text is a whole text of its language (not cut short)


def temperature(cfg: GenerationConfig, steps_left: int) -> float:
    """t_min + (t_max - t_min) * n / N, rounded step by step in float32 as transformers does."""
    f32 = np.float32
    frac = f32(steps_left) / f32(cfg.max_denoising_steps)
    return float(f32(cfg.t_min) + f32(cfg.t_max - cfg.t_min) * frac)


def resolve_config(base: GenerationConfig, overrides: Mapping[str, Any]) -> GenerationConfig:
    """A generation config with the call's non-None overrides applied."""
    return base.replace(**overrides)


def new_token_budget(cfg: GenerationConfig, prompt_length: int) -> int:
    """max_new_tokens, with transformers' quirk: max_length only counts when max_new_tokens is 256."""
    if cfg.max_length and cfg.max_new_tokens == 256:
        budget = cfg.max_length - prompt_length
        if budget <= 0:
            raise ConfigError(f"max_length={cfg.max_length} leaves no room after the "
                              f"{prompt_length}-token prompt")
        return budget
    return cfg.max_new_tokens


class Pins:
    """Positions of the generated text the sampler never changes (infilling / editing)."""

    def __init__(self, vocab_size: int, pinned: Mapping[int, int] | Sequence[int] | None,
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
            if not 0 <= t < vocab_size:
                raise ConfigError(f"pinned token {t} at position {p} is not a valid id")

    def for_block(self, block: int, L: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask [L] bool, ids [L]) of this canvas's pinned positions."""
        mask, ids = np.zeros(L, bool), np.zeros(L, np.int64)
        for p, t in self.tokens.items():
            if block * L <= p < (block + 1) * L:
                mask[p - block * L], ids[p - block * L] = True, t
        return mask, ids


# --- counter-based random numbers --------------------------------------------------------------
# Integer arithmetic any backend does exactly: values stay below 2^32 and are multiplied only by
# constants below 2^27, so no product leaves int64.
def mix32(x: Any) -> Any:
    """A 32-bit integer hash (two multiply-xorshift rounds) of ints or int64 arrays in [0, 2^32)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def seed_key(seed: int | None) -> int:
    """A 32-bit key for a seed (any Python int); None draws one from the operating system."""
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**63))
    seed = int(seed) % 2**64
    return mix32(mix32(seed & M32) ^ (seed >> 32))


def random_bits(key: Array, block: Array, step: Array, stream: int, position: Array) -> Array:
    """32 random bits per (row, position): key, block, step [B] int64, position [L] int64 -> [B, L].

    A hash of (key, stream, block, step, position): any backend gets the same bits."""
    row = mix32(key ^ ((block * 0x3C6EF35 + stream) & M32))
    row = mix32(row ^ ((step * 0x2545F49) & M32))
    return mix32(row[:, None] ^ ((position[None, :] * 0x1B873593) & M32))


def uniforms(B: Any, bits: Array) -> Array:
    """[0, 1) float32 from 32 random bits (their top 24, exact in float32)."""
    return B.to_float32(bits >> 8) * (1.0 / (1 << 24))


def token_ids(bits: Array, vocab_size: int) -> Array:
    """Uniform ids in [0, vocab_size) from 32 random bits."""
    return (bits * vocab_size) >> 32


# --- one denoising step of a batch ------------------------------------------------------------
@dataclass
class StepState:
    """What a batch carries from step to step (device arrays, one row per sequence)."""

    canvas: Array               # [B, L] ids: the decoder's input
    soft: Array | None          # [B, L, H] self-conditioning soft embedding; zeros (or None) on a first step
    history: Array              # [B, K, L] the last K argmax canvases, newest last; -1 before any


@dataclass
class StepKnobs:
    """Per-row settings of a step (device arrays [B] unless noted)."""

    steps_left: Array           # n of the temperature schedule, float32
    total_steps: Array          # N, float32
    t_min: Array                # float32
    t_span: Array               # t_max - t_min, float32
    entropy_bound: Array        # float32
    confidence: Array           # float32
    ignored: Array              # [B, K] bool: history entries a row does not compare (all but its last k)
    key: Array                  # int64 seed keys
    block: Array                # int64 canvas index
    step: Array                 # int64 step index within the canvas (from 1)
    greedy: Array | None        # bool; None: no row is greedy
    all_greedy: bool            # every row greedy: no uniforms needed
    pin_mask: Array | None      # [B, L] bool; None: no pins in the batch
    pin_ids: Array | None       # [B, L] int64
    host_noise: Array | None    # [B, L] int64 renoise ids from a user `noise` function
    host_noise_rows: Array | None   # [B] bool: rows whose renoise ids come from host_noise
    positions: Array            # [L] int64 0..L-1 (the generator's position counter)
    condition: bool             # compute the next step's soft embedding (False on a batch's last step)
    constraints: list[Any] | None = None    # per row a CanvasConstraint or None; None: no row is constrained
    budgets: list[int] | None = None        # per row: positions left from this canvas's first (constraints)
    static_keys: list[int] | None = None    # the host's copies of key, block and step (constrained batches)
    static_blocks: list[int] | None = None
    steps: list[int] | None = None


@dataclass
class StepResult:
    """What one step produces (device arrays)."""

    state: StepState            # the next step's input
    argmax: Array               # [B, L] the draft (committed when the canvas ends)
    stop: Array                 # [B] bool: stable and confident
    accepted: Array             # [B] int: positions accepted this step
    mean_entropy: Array         # [B] float32


def denoise_step(network: Any, frame: Any, state: StepState, knobs: StepKnobs) -> StepResult:
    """One denoising step of every row (spec §4.4): decoder pass, temperature, sample, entropy-bound
    acceptance, renoise, pins, stop decision, self-conditioning for the next step."""
    B = network.backend
    V = network.config.vocab_size
    logits = network.denoise(state.canvas, frame, state.soft)                        # [B, L, V]
    t = knobs.t_min + knobs.t_span * (knobs.steps_left / knobs.total_steps)          # [B] float32
    scaled = B.divide_rows(logits, t)
    del logits
    u = None if knobs.all_greedy else uniforms(B, random_bits(knobs.key, knobs.block, knobs.step, UNIFORM,
                                                              knobs.positions))
    argmax, entropy, sampled = B.token_stats(scaled, u)                              # [B, L] each
    if knobs.greedy is not None and not knobs.all_greedy:
        sampled = B.where(knobs.greedy[:, None], argmax, sampled)
    if knobs.pin_mask is not None:
        argmax = B.where(knobs.pin_mask, knobs.pin_ids, argmax)
        sampled = B.where(knobs.pin_mask, knobs.pin_ids, sampled)
        entropy = B.where(knobs.pin_mask, 0.0, entropy)
    order = B.argsort(entropy)                                                        # [B, L]
    sorted_entropy = B.take_along(entropy, order)
    keep_sorted = B.cumsum(sorted_entropy) - sorted_entropy <= knobs.entropy_bound[:, None]
    accept = B.take_along(keep_sorted, B.argsort(order))                             # inverse permutation
    noise = token_ids(random_bits(knobs.key, knobs.block, knobs.step, RENOISE, knobs.positions), V)
    if knobs.host_noise is not None:
        noise = B.where(knobs.host_noise_rows[:, None], knobs.host_noise, noise)
    canvas = B.where(accept, sampled, noise)
    if knobs.pin_mask is not None:
        canvas = B.where(knobs.pin_mask, knobs.pin_ids, canvas)
    soft = None
    if knobs.constraints is not None:        # the soft embedding goes first: the device works during the walks
        soft = network.condition(scaled) if knobs.condition else None
        canvas, argmax = constrain_rows(B, knobs, scaled, sampled, accept, noise, canvas, argmax)
    elif knobs.condition:
        soft = network.condition(scaled)
    mean_entropy = B.mean(entropy, -1)
    stop = mean_entropy < knobs.confidence                                           # confident ...
    history = state.history
    if history.shape[1]:                                                              # ... and stable
        same = history == argmax[:, None, :]                                          # [B, K, L]
        stop = stop & B.all(B.all(same, -1) | knobs.ignored, -1)
        history = B.concat([history[:, 1:], argmax[:, None, :]], 1)
    return StepResult(StepState(canvas, soft, history), argmax, stop, B.sum(accept * 1, -1), mean_entropy)


def constrain_rows(B: Any, knobs: StepKnobs, scaled: Array, sampled: Array, accept: Array, noise: Array,
                   canvas: Array, argmax: Array) -> tuple[Array, Array]:
    """The constrained rows' canvases and argmax canvases, walked on the host left to right by their
    CanvasConstraint (`portable_dg.constraints`): the model's tokens where the constraint allows
    them after the tokens to their left, allowed replacements elsewhere.  The walk reads the rows'
    samples, acceptance, noise, uniforms and top-K candidates (one host read); a position whose
    candidates are all refused gets a masked choice over its whole row on the device."""
    from .constraints import resample_uniform

    rows = [b for b, c in enumerate(knobs.constraints) if c is not None]
    K = min(max(knobs.constraints[b].candidates for b in rows), scaled.shape[-1])    # a vocabulary may be smaller
    index = B.asarray(np.array(rows, np.int64))
    top_values, top_ids = B.top_k(scaled[index], K)                                 # [R, L, K]
    host = [B.to_numpy(x) for x in (sampled[index], accept[index], noise[index], top_ids, top_values)]
    bits = random_bits(np.array([knobs.static_keys[b] for b in rows], np.int64),
                       np.array([knobs.static_blocks[b] for b in rows], np.int64),
                       np.array([knobs.steps[b] for b in rows], np.int64), UNIFORM,
                       np.arange(canvas.shape[1], dtype=np.int64))
    u = (bits >> 8) * (1.0 / (1 << 24))                                              # as on the device
    V = scaled.shape[-1]
    walked_canvas, walked_argmax = np.zeros(canvas.shape, np.int64), np.zeros(canvas.shape, np.int64)
    for r, b in enumerate(rows):
        def masked_choice(j: int, allowed: np.ndarray, kind: str, b: int = b, r: int = r) -> int:
            mask = np.unpackbits(allowed.view(np.uint8), bitorder="little")[:V].astype(bool)
            row = B.where(B.asarray(mask), scaled[b, j], -1e30)[None]                # [1, V]; exp(-1e30 - max) = 0
            uniform = None if kind == "argmax" else B.asarray(np.array([resample_uniform(u[r, j])], np.float32))
            chosen = B.token_stats(row, uniform)[0 if kind == "argmax" else 2]
            return int(B.to_numpy(chosen)[0])

        sampled_r, accept_r, noise_r, ids_r, values_r = (h[r] for h in host)
        walked_canvas[b], walked_argmax[b] = knobs.constraints[b].walk(
            sampled_r, accept_r, ids_r, values_r, u[r], noise_r, masked_choice, knobs.budgets[b])
    constrained = B.asarray(np.array([c is not None for c in knobs.constraints]))[:, None]
    return (B.where(constrained, B.asarray(walked_canvas), canvas),
            B.where(constrained, B.asarray(walked_argmax), argmax))


def generate(model: Any, prompt_ids: Sequence[int] | np.ndarray, **options: Any) -> GenerateOutput:
    """Generate text after a prompt by block diffusion (transformers' `generate`, one sequence).

    Options (None means the checkpoint's generation config): max_new_tokens, max_denoising_steps,
    entropy_bound, t_min, t_max, stability_threshold, confidence_threshold; seed; noise (a function
    n -> n ids used for every canvas start and renoise, instead of the seeded generator); greedy
    (sample the argmax); start_canvas (the first canvas's initial ids); pinned (generated position
    -> id the sampler never changes, or positions whose ids come from start_canvas); on_step
    (called with a StepInfo after every step) and on_block (a BlockInfo after every canvas);
    json_schema, json_object, regex or grammar: a constraint every written token respects
    (`portable_dg.constraints`; `completed` on the output says whether the text is whole).
    Images: pixel_values, image_position_ids and mm_token_type_ids, the processor's arrays for
    prompt_ids (see `Model.start`); the vision tower runs once, when the prompt is encoded."""
    from .engine import generate_batch

    return generate_batch(model, [prompt_ids], **options)[0]
