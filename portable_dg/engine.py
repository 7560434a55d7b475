"""Many sequences on one model: submitted at any time, denoised together one step at a time, each
leaving when it finishes.  `generate`, `generate_batch`, `pdg serve` and `pdg chat` run on it.

    engine = Engine(model, max_batch=8)
    seq = engine.submit(prompt_ids, seed=0, on_step=print)   # validated here
    while engine.active:
        engine.step()                                         # one denoising step of every sequence
    seq.output                                                # a GenerateOutput

Each step runs `portable_dg.sampler.denoise_step` once over the running sequences ([B, L] canvases
over B rows of one preallocated KV cache, rows of different lengths), then reads back one small
integer array (drafts, stop flags, accepted counts) when anything depends on it: no read at all on
a fixed-length step nobody watches.  A sequence whose canvas ends is committed through the encoder
(all such sequences in one pass), starts its next canvas, or leaves; new sequences are encoded and
join between steps.  Every sequence keeps its own knobs, seed, pins and schedule, and its random
numbers depend only on its own seed and progress, so its output does not depend on the batch.

Prefix reuse: a finished sequence's cache row (its prompt and committed canvases) is kept while
`prefix_rows` allow; a later prompt that starts with those tokens (up to one canvas of difference at
the end) reuses the row and encodes only the rest.  The engine is not thread-safe: one thread calls
`submit`, `cancel` and `step`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable, Mapping, Sequence as Seq

import numpy as np

from .backend import compile_step
from .config import GenerationConfig
from .errors import ConfigError
from .sampler import (INITIAL, INITIAL_UNIFORM, BlockInfo, GenerateOutput, NoiseSource, Pins, StepInfo,
                      StepKnobs, StepState, denoise_step, new_token_budget, random_bits, resolve_config,
                      seed_key, temperature, token_ids)

KNOBS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
         "confidence_threshold", "eos_token_id")


class Sequence:
    """One submitted generation: its settings, its progress and, once done, its output."""

    def __init__(self, seq_id: int, prompt: np.ndarray, cfg: GenerationConfig, n_blocks: int,
                 first_canvas: np.ndarray | None, pins: Pins, key: int, noise: NoiseSource | None,
                 greedy: bool, on_step: Callable[[StepInfo], Any] | None,
                 on_block: Callable[[BlockInfo], Any] | None, constraint: Any = None):
        self.id, self.prompt, self.cfg, self.n_blocks = seq_id, prompt, cfg, n_blocks
        self.constraint = constraint         # a portable_dg.constraints.CanvasConstraint, or None
        self.first_canvas, self.pins, self.key, self.noise, self.greedy = first_canvas, pins, key, noise, greedy
        self.on_step, self.on_block = on_step, on_block
        self.eos = set(cfg.eos_token_id or [])
        self.row: int | None = None          # its KV cache row while running
        self.block = 0                       # canvas being denoised
        self.step = 0                        # steps done in that canvas
        self.blocks: list[np.ndarray] = []   # committed canvases
        self.steps: list[int] = []           # steps per committed canvas
        self.batch_index = -1                # its row in the engine's step arrays
        self.pending_noise: np.ndarray | None = None   # this step's draw of its noise function
        self.renoise: np.ndarray | None = None         # the renoise ids of this step (noise functions)
        self.output: GenerateOutput | None = None
        self.error: Exception | None = None  # what its own callback or noise function raised
        self.cancelled = False

    @property
    def done(self) -> bool:
        """Finished (its output is set), failed (its error is set) or cancelled."""
        return self.output is not None or self.error is not None or self.cancelled

    @property
    def encoded(self) -> np.ndarray:
        """The tokens its cache row holds: the prompt and every committed canvas but the last."""
        return np.concatenate([self.prompt, *self.blocks[:-1]]) if len(self.blocks) > 1 else self.prompt

    def finish(self, tokenizer: Any) -> GenerateOutput:
        """The GenerateOutput of the committed canvases."""
        generated = np.concatenate(self.blocks)
        ids = generated.tolist()
        cut = next((j for j, t in enumerate(ids) if t in self.eos), len(ids))
        pad = self.cfg.pad_token_id
        valid = int((generated != pad).sum()) if pad is not None else len(ids)
        text = tokenizer.decode(ids[:cut]) if tokenizer is not None else None
        finished = cut < len(ids)
        completed = None if self.constraint is None else self.constraint.accepting
        self.output = GenerateOutput(np.concatenate([self.prompt, generated])[None, :], ids[:cut], text,
                                     self.steps, len(self.prompt), finished, valid / max(1, sum(self.steps)),
                                     completed)
        return self.output


@dataclasses.dataclass
class Parked:
    """A finished sequence's cache row kept for prefix reuse."""

    row: int
    tokens: np.ndarray


class Engine:
    """Sequences of one model, denoised together, at most `max_batch` at a time (the others wait
    in submission order).  `prefix_rows` cache rows of finished sequences are kept for reuse."""

    def __init__(self, model: Any, max_batch: int = 8, prefix_rows: int = 0, network: Any = None):
        for name, value, low in (("max_batch", max_batch, 1), ("prefix_rows", prefix_rows, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        self.model = model
        self.network = network or model.network           # (evaluate.py passes a stand-in)
        self.backend = model.backend
        self.max_batch, self.prefix_rows = max_batch, prefix_rows
        self.cache = self.network.make_cache(max_batch + prefix_rows, model.max_context)
        self.free_rows = list(range(max_batch + prefix_rows))
        self.parked: deque[Parked] = deque()
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.next_id = 0
        self.step_fn = compile_step(self.backend, denoise_step)
        self.batch: StepState | None = None    # aligned with self.running
        self.frame = None
        self.static: dict[str, Any] = {}
        self.dirty = True
        self.positions = self.backend.asarray(np.arange(model.canvas_length, dtype=np.int64))

    # --- the sequences --------------------------------------------------------------------------
    def submit(self, prompt_ids: Seq[int] | np.ndarray, *, seed: int | None = None,
               noise: NoiseSource | None = None, greedy: bool = False, start_canvas: Seq[int] | None = None,
               pinned: Mapping[int, int] | Seq[int] | None = None,
               on_step: Callable[[StepInfo], Any] | None = None,
               on_block: Callable[[BlockInfo], Any] | None = None, json_schema: Any = None,
               json_object: bool = False, regex: str | None = None, grammar: str | None = None,
               constrain_noise: bool = False, **knobs: Any) -> Sequence:
        """Queue a generation; the options are `portable_dg.generate`'s.  Bad options raise here."""
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
        model, L = self.model, self.model.canvas_length
        cfg = resolve_config(model.generation_config, knobs)
        prompt = model.check_ids(prompt_ids, "prompt_ids")
        if len(prompt) == 0:
            raise ConfigError("prompt_ids is empty: the encoder needs at least one token")
        n_blocks = -(-new_token_budget(cfg, len(prompt)) // L)
        limit = model.config.max_position_embeddings
        if len(prompt) + n_blocks * L > limit:
            raise ConfigError(f"prompt ({len(prompt)} tokens) + {n_blocks} canvas(es) of {L} exceeds the "
                              f"model's context of {limit} positions")
        first = None
        if start_canvas is not None:
            first = model.check_ids(start_canvas, "start_canvas")
            if len(first) != L:
                raise ConfigError(f"start_canvas has {len(first)} ids, expected the canvas length {L}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        pins = Pins(model.config.vocab_size, pinned, first, n_blocks * L)
        constraint = self.constraint(cfg, pins, json_schema, json_object, regex, grammar, constrain_noise)
        seq = Sequence(self.next_id, prompt, cfg, n_blocks, first, pins, seed_key(seed), noise, bool(greedy),
                       on_step, on_block, constraint)
        self.next_id += 1
        self.waiting.append(seq)
        return seq

    def constraint(self, cfg: GenerationConfig, pins: Pins, json_schema: Any, json_object: bool,
                   regex: str | None, grammar: str | None, constrain_noise: bool) -> Any:
        """The CanvasConstraint of a submission's constraint options, or None."""
        if json_schema is None and not json_object and regex is None and grammar is None:
            return None
        from .constraints import CanvasConstraint, make_constraint, token_bridge

        constraint = make_constraint(json_schema=json_schema, json_object=json_object, regex=regex, grammar=grammar)
        if self.model.tokenizer is None:
            raise ConfigError(f"{self.model.source.path} has no tokenizer: a constraint needs one to read tokens")
        if pins.tokens:
            raise ConfigError("pinned positions and a constraint cannot be combined (the walk cannot look ahead "
                              "to a pinned token)")
        bridge = token_bridge(self.model.tokenizer, self.model.config.vocab_size, cfg.eos_token_id or [])
        return CanvasConstraint(constraint, bridge, constrain_noise=bool(constrain_noise))

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence: it takes no further step and frees its place in the batch."""
        if seq.done:
            return
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.release(seq, keep=False)
            self.dirty = True

    @property
    def active(self) -> int:
        """Sequences submitted and not yet finished or cancelled."""
        return len(self.running) + len(self.waiting)

    def run(self) -> None:
        """Step until every submitted sequence is done."""
        while self.active:
            self.step()

    # --- one step ---------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit waiting sequences (encoding their prompts), then one denoising step of every running
        sequence; canvases that end are committed.  Returns the sequences that finished (their
        `output` set) or failed (their `error` set: one of their own callbacks or noise functions
        raised; the other sequences are not affected)."""
        self.admit()
        failed = self.noise_failures()
        if not self.running:
            return failed
        if self.dirty:
            self.rebuild()
        knobs = self.step_knobs()
        step = denoise_step if knobs.constraints is not None else self.step_fn    # walks: host work, never captured
        result = step(self.network, self.frame, self.batch, knobs)
        self.batch = result.state
        ends = [s.step + 1 == s.cfg.max_denoising_steps for s in self.running]
        can_stop = [s.step + 1 > s.cfg.stability_threshold for s in self.running]
        watched = any(s.on_step is not None for s in self.running)
        for s in self.running:
            s.step += 1
        if not (any(ends) or any(can_stop) or watched):
            return failed                                       # nothing on the host depends on this step
        B = self.backend
        packed = B.to_numpy(B.concat([result.argmax, result.stop[:, None] * 1, result.accepted[:, None] * 1], 1))
        entropies = B.to_numpy(result.mean_entropy) if watched else None
        return failed + self.after_step(packed, entropies, ends)

    def noise_failures(self) -> list[Sequence]:
        """Call the user `noise` functions for this step, in transformers' order: a canvas's starting
        ids when it starts (drawn even when start_canvas replaces them), then the step's renoise
        ids.  A sequence whose function raises or returns the wrong shape leaves with the error."""
        failed = []
        for seq in list(self.running):
            if seq.noise is None:
                continue
            try:
                if seq.step == 0:
                    seq.pending_noise = self.draw(seq)
                seq.renoise = self.draw(seq)
            except Exception as e:
                seq.error = e
                self.running.remove(seq)
                self.release(seq, keep=False)
                self.dirty = True
                failed.append(seq)
        return failed

    def draw(self, seq: Sequence) -> np.ndarray:
        """L ids from a sequence's noise function, checked."""
        L, V = self.model.canvas_length, self.model.config.vocab_size
        ids = np.asarray(seq.noise(L))
        if ids.shape != (L,) or ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= V)):
            raise ConfigError(f"noise({L}) must return {L} integer ids in [0, {V}), got shape {list(ids.shape)} "
                              f"of {ids.dtype}")
        return ids.astype(np.int64)

    def after_step(self, packed: np.ndarray, entropies: np.ndarray | None, ends: list[bool]) -> list[Sequence]:
        """Report the step, end canvases, commit them, retire finished sequences.  A sequence whose
        own callback raises leaves with that error; the others go on."""
        L = self.model.canvas_length
        committing, finished = [], []
        for b, seq in enumerate(list(self.running)):
            argmax, stopped, accepted = packed[b, :L], bool(packed[b, L]), int(packed[b, L + 1])
            try:
                if seq.on_step is not None:
                    n = seq.cfg.max_denoising_steps - seq.step + 1
                    seq.on_step(StepInfo(seq.block, seq.step, n, temperature(seq.cfg, n),
                                         argmax.astype(np.int64), accepted, float(entropies[b]), stopped))
                if not (stopped or ends[b]):
                    continue
                done = self.end_canvas(seq, argmax.astype(np.int64))
            except Exception as e:
                seq.error, done = e, True
            (finished if done else committing).append(seq)
        if committing:
            ids = np.stack([s.blocks[-1] for s in committing])                          # [n, L]
            self.network.encode(ids, self.cache, [s.row for s in committing])
            for seq in committing:
                seq.block, seq.step = seq.block + 1, 0
        for seq in finished:
            self.running.remove(seq)
            self.release(seq, keep=True)
        self.dirty = self.dirty or bool(committing or finished)
        return finished

    def end_canvas(self, seq: Sequence, committed: np.ndarray) -> bool:
        """Commit a canvas's argmax (pad after an EOS); True when the sequence is finished."""
        eos_at = [j for j, t in enumerate(committed.tolist()) if t in seq.eos]
        if eos_at and seq.cfg.pad_token_id is not None:
            committed[eos_at[0] + 1:] = seq.cfg.pad_token_id
        if seq.constraint is not None:
            seq.constraint.commit(committed)
        seq.blocks.append(committed)
        seq.steps.append(seq.step)
        done = bool(eos_at) or len(seq.blocks) == seq.n_blocks
        if seq.on_block is not None:
            seq.on_block(BlockInfo(seq.block, committed.copy(), done))
        if done:
            seq.finish(self.model.tokenizer)
        return done

    # --- cache rows -----------------------------------------------------------------------------------
    def admit(self) -> None:
        """Move waiting sequences into the batch while it has room, encoding their prompts (equal
        prompt remainders together)."""
        joining = []
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            seq = self.waiting.popleft()
            rest = self.place(seq)
            joining.append((seq, rest))
        if not joining:
            return
        by_length: dict[int, list[tuple[Sequence, np.ndarray]]] = {}
        for seq, rest in joining:
            if len(rest):
                by_length.setdefault(len(rest), []).append((seq, rest))
        for group in by_length.values():
            self.network.encode(np.stack([rest for _, rest in group]), self.cache, [s.row for s, _ in group])
        self.running.extend(seq for seq, _ in joining)
        self.dirty = True

    def place(self, seq: Sequence) -> np.ndarray:
        """Give a sequence a cache row, reusing a parked row whose tokens its prompt starts with;
        returns the prompt tokens still to encode."""
        best, best_common = None, 0
        for parked in self.parked:
            common = common_prefix(parked.tokens, seq.prompt)
            if common > best_common and self.cache.truncate(parked.row, common):
                best, best_common = parked, common
        if best is not None:
            self.parked.remove(best)
            self.cache.truncate(best.row, best_common)
            seq.row = best.row
            return seq.prompt[best_common:]
        if not self.free_rows:
            self.free_rows.append(self.parked.popleft().row)      # evict the oldest parked row
        seq.row = self.free_rows.pop()
        self.cache.lengths[seq.row] = 0
        return seq.prompt

    def release(self, seq: Sequence, keep: bool) -> None:
        """Free a sequence's row, or park it for prefix reuse."""
        if seq.row is None:
            return
        if keep and self.prefix_rows:
            self.parked.append(Parked(seq.row, seq.encoded))
            while len(self.parked) > self.prefix_rows:
                self.free_rows.append(self.parked.popleft().row)
        else:
            self.free_rows.append(seq.row)
        seq.row = None

    # --- the batch's device arrays -------------------------------------------------------------------------
    def rebuild(self) -> None:
        """Assemble the running sequences' step state, knobs and decoder frame after a change."""
        B, L = self.backend, self.model.canvas_length
        previous = self.batch
        K = max(s.cfg.stability_threshold for s in self.running)
        rows, canvases, softs, histories = [], [], [], []
        fresh = [s.step == 0 for s in self.running]
        for seq, is_fresh in zip(self.running, fresh):
            if is_fresh:
                canvases.append(self.initial_canvas(seq))
                softs.append(None)
                histories.append(B.asarray(np.full((1, K, L), -1, np.int64)))
            else:
                b = seq.batch_index
                canvases.append(previous.canvas[b:b + 1])
                softs.append(previous.soft[b:b + 1])
                history = previous.history[b:b + 1]
                have = history.shape[1]
                if have >= K:
                    histories.append(history[:, have - K:])
                else:
                    histories.append(B.concat([B.asarray(np.full((1, K - have, L), -1, np.int64)), history], 1))
            rows.append(seq.row)
        soft = None
        if not all(fresh):
            shape = next(s for s in softs if s is not None).shape                 # [1, L, H]
            soft = B.concat([s if s is not None else B.zeros(shape) for s in softs], 0)
        self.batch = StepState(B.concat(canvases, 0), soft, B.concat(histories, 0))
        for b, seq in enumerate(self.running):
            seq.batch_index = b
        self.frame = self.network.frame(self.cache, rows, L, decoder=True)
        self.static = self.static_knobs(K)
        self.dirty = False

    def initial_canvas(self, seq: Sequence):
        """A sequence's starting canvas [1, L] on the device: start_canvas, its noise function or the
        seeded generator, with its pins."""
        B, L, V = self.backend, self.model.canvas_length, self.model.config.vocab_size
        if seq.constraint is not None and seq.constraint.constrain_noise:     # allowed tokens from the start
            return B.asarray(self.constrained_start(seq)[None])
        if seq.block == 0 and seq.first_canvas is not None:
            canvas = B.asarray(seq.first_canvas[None])
        elif seq.noise is not None:
            canvas = B.asarray(seq.pending_noise[None])        # a new canvas's start (drawn this step)
        else:
            key, block, zero = (B.asarray(np.array([v], np.int64)) for v in (seq.key, seq.block, 0))
            canvas = token_ids(random_bits(key, block, zero, INITIAL, self.positions), V)
        mask, ids = seq.pins.for_block(seq.block, L)
        if mask.any():
            canvas = B.where(B.asarray(mask[None]), B.asarray(ids[None]), canvas)
        return canvas

    def constrained_start(self, seq: Sequence) -> np.ndarray:
        """A constrained sequence's starting canvas [L], made on the host by its walk from the noise
        it would start from (the same bits the device would draw)."""
        L, V = self.model.canvas_length, self.model.config.vocab_size
        key, block, zero = np.array([seq.key]), np.array([seq.block]), np.array([0])
        positions = np.arange(L, dtype=np.int64)
        if seq.block == 0 and seq.first_canvas is not None:
            noise = seq.first_canvas
        elif seq.noise is not None:
            noise = seq.pending_noise
        else:
            noise = token_ids(random_bits(key, block, zero, INITIAL, positions), V)[0]
        uniforms = (random_bits(key, block, zero, INITIAL_UNIFORM, positions)[0] >> 8) * (1.0 / (1 << 24))
        return seq.constraint.start(noise, uniforms, (seq.n_blocks - seq.block) * L)

    def static_knobs(self, K: int) -> dict[str, Any]:
        """The knobs that change only with the batch's membership or canvases."""
        B, L, seqs = self.backend, self.model.canvas_length, self.running
        f32 = np.float32

        def column(values, dtype):
            return B.asarray(np.array(values, dtype))

        pins = [s.pins.for_block(s.block, L) for s in seqs]
        has_pins = any(m.any() for m, _ in pins)
        greedy = [s.greedy for s in seqs]
        host_noise = [s.noise is not None for s in seqs]
        ignored = np.array([[j < K - s.cfg.stability_threshold for j in range(K)] for s in seqs], bool)
        return dict(
            total_steps=column([s.cfg.max_denoising_steps for s in seqs], f32),
            t_min=column([f32(s.cfg.t_min) for s in seqs], f32),
            t_span=column([f32(s.cfg.t_max - s.cfg.t_min) for s in seqs], f32),
            entropy_bound=column([s.cfg.entropy_bound for s in seqs], f32),
            confidence=column([s.cfg.confidence_threshold for s in seqs], f32),
            ignored=B.asarray(ignored.reshape(len(seqs), K)),
            key=column([s.key for s in seqs], np.int64),
            block=column([s.block for s in seqs], np.int64),
            greedy=column(greedy, bool) if any(greedy) else None,
            all_greedy=all(greedy),
            pin_mask=B.asarray(np.stack([m for m, _ in pins])) if has_pins else None,
            pin_ids=B.asarray(np.stack([i for _, i in pins])) if has_pins else None,
            host_noise_rows=column(host_noise, bool) if any(host_noise) else None,
            positions=self.positions,
            **self.constraint_knobs(),
        )

    def constraint_knobs(self) -> dict[str, Any]:
        """The constrained rows' walk states and budgets, and the host's copies of their counters."""
        seqs, L = self.running, self.model.canvas_length
        if all(s.constraint is None for s in seqs):
            return {}
        return dict(constraints=[s.constraint for s in seqs], budgets=[(s.n_blocks - s.block) * L for s in seqs],
                    static_keys=[s.key for s in seqs], static_blocks=[s.block for s in seqs])

    def step_knobs(self) -> StepKnobs:
        """This step's knobs: the static ones plus the step counters and host noise."""
        B, L = self.backend, self.model.canvas_length
        seqs = self.running
        host_noise = None
        if self.static["host_noise_rows"] is not None:
            host_noise = B.asarray(np.stack([s.renoise if s.noise is not None else np.zeros(L, np.int64)
                                             for s in seqs]))
        last = all(s.step + 1 == s.cfg.max_denoising_steps for s in seqs)
        steps = [s.step + 1 for s in seqs]
        return StepKnobs(
            steps_left=B.asarray(np.array([s.cfg.max_denoising_steps - s.step for s in seqs], np.float32)),
            step=B.asarray(np.array(steps, np.int64)), host_noise=host_noise, condition=not last,
            steps=steps if self.static.get("constraints") else None, **self.static)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def generate_batch(model: Any, prompts: Seq[Seq[int] | np.ndarray], *, max_batch: int | None = None,
                   **options: Any) -> list[GenerateOutput]:
    """`portable_dg.generate` for several prompts at once, outputs in prompt order.

    Every option may be one value for all prompts or a list with one value per prompt
    (`start_canvas` and `pinned` are always per prompt when given as a list of lists/dicts).
    Under deterministic settings (greedy, or a fixed noise function) each output equals what
    `generate` gives for that prompt alone."""
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("generate_batch needs at least one prompt")
    engine = Engine(model, max_batch or len(prompts))
    sequences = [engine.submit(p, **{k: per_prompt(k, v, i, len(prompts)) for k, v in options.items()})
                 for i, p in enumerate(prompts)]
    engine.run()
    for seq in sequences:
        if seq.error is not None:
            raise seq.error
    return [s.output for s in sequences]


def per_prompt(name: str, value: Any, i: int, n: int) -> Any:
    """Prompt i's value of an option given once for all or as a list of n.  `start_canvas` and
    `pinned` are lists themselves: theirs is per prompt when every entry is None or a container."""
    if not isinstance(value, (list, tuple)):
        return value
    if name in ("start_canvas", "pinned") and not all(
            v is None or isinstance(v, (list, tuple, dict, np.ndarray)) for v in value):
        return value
    if len(value) != n:
        raise ConfigError(f"{name}: {len(value)} values for {n} prompts")
    return value[i]
