"""DiffusionGemma, written once against the backend protocol (`portable_dg.backend.Backend`).

The same weights serve two roles (spec §0): a causal *encoder* that reads the prompt and every
committed block into a KV cache, and a bidirectional *decoder* that denoises one canvas of L tokens
placed after the cached context, reading the cache without writing it.  Every backend runs these
lines; a backend only supplies ops and weight storage.

A pass runs B sequences at once ([B, T] ids), each at its own positions over its own row of a
`KVCache`.  Attention reads each sequence's context on its own (rows hold different lengths);
everything else runs on the whole batch, flattened to [B*T, H] where an op wants tokens.

Weights are addressed by their Hugging Face stored names (`model.decoder.*`, plus the encoder's own
`model.encoder.language_model.layers.{i}.layer_scalar`); see `portable_dg.checkpoint`.

Images (docs/vision.md §2-3): the encoder's first pass over a prompt takes the vision tower's soft
tokens (`gemma4_vision.py`) in place of the embeddings of the image placeholders, and the tokens of
one image (a vision block) see each other whatever the causal and sliding-window rules say, on every
layer, as transformers' `generate` builds its masks.  A prefill chunk never splits a block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from portable_dg.backend import Array, Backend
from portable_dg.checkpoint import bf16_to_f32, f32_to_bf16_bits
from portable_dg.config import SLIDING, DiffusionGemmaConfig, LayerGeometry

DEC = "model.decoder."
ENC_SCALAR = "model.encoder.language_model.layers.{i}.layer_scalar"
# Full-attention cache slots are added in multiples of this many positions (one copy per growth).
CACHE_CHUNK = 1024
# Attention scores (query tokens x keys x heads) one encoder chunk may make: long prompts are encoded
# in chunks of at most this many scores (at least PREFILL_MIN tokens each).
PREFILL_SCORES = 1 << 26
PREFILL_MIN = 64
# Serial numbers of frames: what a captured step is keyed by (never an object's id()).
FRAME_SERIALS = itertools.count()


def rope_inv_freq(g: LayerGeometry) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] float32 for one layer (spec §3.4).

    "default" rotates the whole head; "proportional" keeps int(fraction * d // 2) frequencies with
    the exponent's denominator equal to the full head dim, and zeros (no rotation) elsewhere."""
    d = g.head_dim
    n_rot = int(g.rope_fraction * d // 2)
    exponents = np.arange(0, 2 * n_rot, 2, dtype=np.float32) / np.float32(d)
    rotated = (np.float32(1.0) / (np.float32(g.rope_theta) ** exponents)).astype(np.float32)
    return np.concatenate([rotated, np.zeros(d // 2 - n_rot, np.float32)])


def rope_table(inv_freq: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, d] float32 of positions 0..length-1: theta = p * f, angle [theta, theta]."""
    theta = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]      # [P, d/2]
    angle = np.concatenate([theta, theta], axis=-1)                               # [P, d]
    return np.cos(angle), np.sin(angle)


def round_to_dtype(value: float, dtype: str) -> float:
    """A Python float rounded to a float dtype given by name (bfloat16 included: round to nearest even)."""
    if dtype == "bfloat16":
        return float(bf16_to_f32(f32_to_bf16_bits(np.array([value], np.float32)))[0])
    return float(np.dtype(dtype).type(value))


def ring_runs(start: int, stop: int, size: int) -> list[tuple[int, int, int]]:
    """Positions start..stop-1 (stop - start <= size) in a ring of `size` slots, as at most two
    contiguous runs (first position, first slot, count)."""
    runs, position = [], start
    while position < stop:
        slot = position % size
        count = min(stop - position, size - slot)
        runs.append((position, slot, count))
        position += count
    return runs


class KVCache:
    """Keys and values of the encoded context of `rows` sequences, preallocated on the backend and
    written in place by the encoder (post-norm, post-RoPE K; post-v_norm V).

    Full layers keep every position (slot = position) in `capacity` slots per row, grown by whole
    `CACHE_CHUNK`s (one copy per growth, never per commit).  Sliding layers keep a ring of
    `sliding_window - 1 + slack` slots (slot = position mod ring): the decoder reads the last
    `sliding_window - 1` positions of a row, which is what transformers' DynamicCache keeps (spec
    §3.5); the slack lets a row be cut back by up to `slack` positions (prefix reuse).  `lengths`
    holds the positions encoded per row (host ints); `generation` changes whenever the buffers are
    reallocated, so a captured step can tell its buffers are gone."""

    def __init__(self, backend: Backend, config: DiffusionGemmaConfig, rows: int, capacity: int = 0,
                 slack: int | None = None):
        self.backend, self.config, self.rows = backend, config, rows
        self.window = config.sliding_window
        self.slack = config.canvas_length if slack is None else slack
        self.ring = config.sliding_window - 1 + self.slack
        self.capacity = 0
        self.lengths = np.zeros(rows, np.int64)
        self.generation = 0
        self.keys: list[Array] = [None] * config.num_hidden_layers
        self.values: list[Array] = [None] * config.num_hidden_layers
        for i, g in enumerate(config.layers):
            if g.kind == SLIDING:
                self.keys[i], self.values[i] = (backend.zeros((rows, self.ring, g.num_kv_heads, g.head_dim))
                                                for _ in range(2))
        self.reserve(capacity)

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions per row on the full layers (grown in whole chunks)."""
        if positions <= self.capacity:
            return
        capacity = -(-positions // CACHE_CHUNK) * CACHE_CHUNK
        for i, g in enumerate(self.config.layers):
            if g.kind == SLIDING:
                continue
            for store in (self.keys, self.values):
                grown = self.backend.zeros((self.rows, capacity, g.num_kv_heads, g.head_dim))
                if self.capacity:
                    grown[:, :self.capacity] = store[i]
                store[i] = grown
        self.capacity = capacity
        self.generation += 1

    def truncate(self, row: int, length: int) -> bool:
        """Cut a row back to its first `length` positions; False when the sliding rings no longer
        hold the window before `length` (then the row must be encoded afresh)."""
        current = int(self.lengths[row])
        if length > current or current - length > self.slack:
            return False
        self.lengths[row] = length
        return True

    def write(self, i: int, row: int, start: int, k: Array, v: Array) -> None:
        """Store k, v [T, nkv, d] of positions start..start+T-1 of one row in layer i."""
        T = k.shape[0]
        if self.config.layers[i].kind != SLIDING:
            self.keys[i][row, start:start + T] = k
            self.values[i][row, start:start + T] = v
            return
        keep = min(T, self.ring)                                      # older ones fall out of the ring
        for position, slot, count in ring_runs(start + T - keep, start + T, self.ring):
            offset = position - start
            self.keys[i][row, slot:slot + count] = k[offset:offset + count]
            self.values[i][row, slot:slot + count] = v[offset:offset + count]

    def read(self, i: int, row: int, start: int, stop: int) -> tuple[Array, Array]:
        """Keys and values [stop - start, nkv, d] of positions start..stop-1 of one row, in order."""
        if self.config.layers[i].kind != SLIDING:
            return self.keys[i][row, start:stop], self.values[i][row, start:stop]
        runs = ring_runs(start, stop, self.ring)
        if len(runs) <= 1:
            slot, count = (runs[0][1], runs[0][2]) if runs else (0, 0)
            return self.keys[i][row, slot:slot + count], self.values[i][row, slot:slot + count]
        B = self.backend
        return tuple(B.concat([store[i][row, slot:slot + count] for _, slot, count in runs], 0)
                     for store in (self.keys, self.values))

    def visible(self, i: int, length: int) -> int:
        """How many of the last `length` cached positions a canvas query sees in layer i."""
        return min(length, self.window - 1) if self.config.layers[i].kind == SLIDING else length


@dataclass
class ContextGroup:
    """Batch members that read context of the same length in one layer, with that context stacked."""

    members: list[int]          # batch indices, ascending
    keys: Array                 # [G, S, nkv, d]
    values: Array               # [G, S, nkv, d]


def vision_blocks(mm_token_type_ids: np.ndarray) -> np.ndarray:
    """Block ids [T] of transformers' `get_block_sequence_ids_for_mask`: each maximal run of image
    (1) or video (2) tokens is one block, numbered 0, 1, ... in order; -1 elsewhere."""
    vision = np.isin(mm_token_type_ids, (1, 2))
    starts = vision & ~np.concatenate([[False], vision[:-1]])
    return np.where(vision, np.cumsum(starts) - 1, -1)


def chunk_end(blocks: np.ndarray, start: int, proposed: int) -> int:
    """Where a prefill chunk starting at `start` ends (exclusive): at `proposed` or the nearest
    earlier position that splits no row's vision block (blocks [B, T]); when the block at `start`
    is longer than the chunk, at its end."""
    T = blocks.shape[1]
    if proposed >= T:
        return T
    splits = ((blocks[:, :-1] == blocks[:, 1:]) & (blocks[:, 1:] >= 0)).any(0)     # [T-1]: cut before p+1
    allowed = np.flatnonzero(~splits) + 1
    before = allowed[(allowed > start) & (allowed <= proposed)]
    if len(before):
        return int(before[-1])
    after = allowed[allowed > proposed]
    return int(after[0]) if len(after) else T


@dataclass
class ImagePrompt:
    """A prompt's images as one encoder pass over its ids [T] takes them: the soft tokens that
    replace the placeholders' embeddings, and the vision blocks whose tokens see each other."""

    features: Array | None      # [n, H] soft tokens in the compute dtype (None when n = 0)
    slots: np.ndarray           # [T] row of `features` each position takes; -1: its token embedding
    blocks: np.ndarray          # [T] vision block per position (`vision_blocks`); -1: none


@dataclass
class Frame:
    """Where the tokens of one pass sit: per batch member its cache row and positions, and the
    rotary tables at those positions.  A decoder frame also holds, per layer, the context the
    members read (grouped by length so that each group is one attention call), fixed for a canvas."""

    rows: list[int]
    positions: np.ndarray                       # [B, T] absolute positions (host)
    rope: dict[bytes, tuple[Array, Array]]      # inv_freq bytes -> (cos, sin) [B, T, 1, d]
    contexts: list[list[ContextGroup]] | None = None   # [layer] -> groups
    blocks: list[Array | None] | None = None    # encoder: per member, vision blocks [1, T] (None: none)
    serial: int = field(default_factory=lambda: next(FRAME_SERIALS))


@dataclass
class DiffusionGemma:
    """The model: `encode` ids into a cache, `denoise` canvases given the cache."""

    config: DiffusionGemmaConfig
    weights: Mapping[str, Any]
    backend: Backend
    inv_freq: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inv_freq = [rope_inv_freq(g) for g in self.config.layers]
        # sqrt(H) rounded to the compute dtype, as transformers casts it to the embedding dtype.
        self.embed_scale = round_to_dtype(self.config.embed_scale, self.backend.compute_dtype)
        self.rope_tables: dict[bytes, tuple[Array, Array]] = {}
        self.rope_length = 0

    def w(self, name: str) -> Any:
        return self.weights[DEC + name]

    def make_cache(self, rows: int = 1, capacity: int = 0) -> KVCache:
        """An empty cache for `rows` sequences with room for `capacity` positions each."""
        return KVCache(self.backend, self.config, rows, capacity)

    # --- where a pass's tokens sit --------------------------------------------------------------
    def frame(self, cache: KVCache, rows: Sequence[int], T: int, decoder: bool) -> Frame:
        """The frame of a pass of T tokens per row placed after each row's cached positions."""
        rows = list(rows)
        positions = cache.lengths[rows][:, None] + np.arange(T)[None, :]            # [B, T]
        if not decoder:
            cache.reserve(int(positions.max()) + 1)
        self.grow_rope(int(positions.max()) + 1)
        index = self.backend.asarray(positions)
        rope = {key: (cos[index][:, :, None, :], sin[index][:, :, None, :])          # [B, T, 1, d]
                for key, (cos, sin) in self.rope_tables.items()}
        contexts = None
        if decoder:
            contexts = [self.context_groups(cache, i, rows) for i in range(self.config.num_hidden_layers)]
        return Frame(rows, positions, rope, contexts)

    def context_groups(self, cache: KVCache, i: int, rows: list[int]) -> list[ContextGroup]:
        """Layer i's context of each row (the positions a canvas query sees), grouped by length."""
        B = self.backend
        by_length: dict[int, list[int]] = {}
        for b, row in enumerate(rows):
            by_length.setdefault(cache.visible(i, int(cache.lengths[row])), []).append(b)
        groups = []
        for length, members in by_length.items():
            reads = [cache.read(i, rows[b], int(cache.lengths[rows[b]]) - length, int(cache.lengths[rows[b]]))
                     for b in members]
            groups.append(ContextGroup(members, *(B.concat([r[j][None] for r in reads], 0) for j in (0, 1))))
        return groups

    def grow_rope(self, length: int) -> None:
        """Rotary tables (computed on the host in float32, stored in the compute dtype) covering
        positions 0..length-1, grown by doubling."""
        if length <= self.rope_length:
            return
        self.rope_length = max(CACHE_CHUNK, 1 << (length - 1).bit_length())
        for inv_freq in self.inv_freq:
            cos, sin = rope_table(inv_freq, self.rope_length)
            self.rope_tables[inv_freq.tobytes()] = (self.backend.asarray(cos, compute=True),
                                                    self.backend.asarray(sin, compute=True))

    # --- building blocks ---------------------------------------------------------------------
    def norm(self, x: Array, name: str | None) -> Array:
        return self.backend.rms_norm(x, None if name is None else self.w(name), self.config.rms_norm_eps)

    def mlp(self, x: Array, prefix: str) -> Array:
        """down(gelu_tanh(gate(x)) * up(x)); x [..., H] -> [..., H]."""
        B = self.backend
        gate = B.linear(x, self.w(prefix + "gate_proj.weight"))
        up = B.linear(x, self.w(prefix + "up_proj.weight"))
        return B.linear(B.gelu_tanh(gate) * up, self.w(prefix + "down_proj.weight"))

    def router(self, x: Array, prefix: str) -> tuple[Array, Array]:
        """Softmax over experts, top-k, renormalise, per-expert gain; x [N, H] is the raw residual."""
        B, cfg = self.backend, self.config
        z = B.rms_norm(x, None, cfg.rms_norm_eps) * self.w(prefix + "router.scale") * cfg.hidden_size ** -0.5
        probs = B.softmax(B.linear(z, self.w(prefix + "router.proj.weight")))        # [N, E]
        weights, ids = B.top_k(probs, cfg.top_k_experts)                              # [N, k]
        weights = weights / B.sum(weights, -1)[:, None]
        return weights * B.take(self.w(prefix + "router.per_expert_scale"), ids), ids

    def moe(self, x: Array, weights: Array, ids: Array, prefix: str) -> Array:
        """Sum over the k selected experts of weight * down(gelu(gate(x)) * up(x)); [N, H] -> [N, H]."""
        B, inter = self.backend, self.config.moe_intermediate_size
        gate_up = B.expert_linear(x, self.w(prefix + "experts.gate_up_proj"), ids)  # [N, k, 2I]
        hidden = B.gelu_tanh(gate_up[..., :inter]) * gate_up[..., inter:]           # [N, k, I]
        out = B.expert_linear(hidden, self.w(prefix + "experts.down_proj"), ids)    # [N, k, H]
        return B.sum(out * weights[..., None], 1)

    def attention(self, i: int, x: Array, frame: Frame, cache: KVCache) -> Array:
        """Self-attention of layer i, x [B, T, H].  Encoder frames (no contexts) attend causally
        over [cached context ; x] and write x's keys and values into the cache; decoder frames
        attend over [context ; x] with no mask and write nothing."""
        B, cfg, g = self.backend, self.config, self.config.layers[i]
        p = f"layers.{i}.self_attn."
        n, T, nq, d = x.shape[0], x.shape[1], cfg.num_attention_heads, g.head_dim
        q = B.linear(x, self.w(p + "q_proj.weight")).reshape(n, T, nq, d)
        k_raw = B.linear(x, self.w(p + "k_proj.weight")).reshape(n, T, g.num_kv_heads, d)
        v = (B.linear(x, self.w(p + "v_proj.weight")).reshape(n, T, g.num_kv_heads, d)
             if g.has_v_proj else k_raw)                                # full layers: V = raw K
        cos, sin = frame.rope[self.inv_freq[i].tobytes()]
        q = B.rope(self.norm(q, p + "q_norm.weight"), cos, sin)
        k = B.rope(self.norm(k_raw, p + "k_norm.weight"), cos, sin)
        v = B.rms_norm(v, None, cfg.rms_norm_eps)
        if frame.contexts is None:
            blocks = frame.blocks or [None] * len(frame.rows)
            out = B.concat([self.encoder_attention(i, row, q[b:b + 1], k[b:b + 1], v[b:b + 1], cache, blocks[b])
                            for b, row in enumerate(frame.rows)], 0)                 # [B, T, nq, d]
        else:
            out = self.decoder_attention(q, k, v, frame.contexts[i])
        return B.linear(out.reshape(n, T, nq * d), self.w(p + "o_proj.weight"))

    def decoder_attention(self, q: Array, k: Array, v: Array, groups: list[ContextGroup]) -> Array:
        """Every canvas query sees its context and the whole canvas, no mask: q [B, T, nq, d],
        k, v [B, T, nkv, d] -> [B, T, nq, d], one attention call per context group."""
        B = self.backend
        outs, order = [], []
        for group in groups:
            if len(groups) == 1:
                qg, kg, vg = q, k, v
            else:
                index = B.asarray(np.array(group.members, np.int64))
                qg, kg, vg = q[index], k[index], v[index]
            outs.append(B.attention(qg, B.concat([group.keys, kg], 1), B.concat([group.values, vg], 1),
                                    causal_shift=None, window=None))
            order.extend(group.members)
        if len(groups) == 1:
            return outs[0]
        inverse = np.argsort(np.array(order))                  # back from group order to batch order
        return B.concat(outs, 0)[B.asarray(inverse)]

    def encoder_attention(self, i: int, row: int, q: Array, k: Array, v: Array, cache: KVCache,
                          blocks: Array | None = None) -> Array:
        """Causal attention of one row's new tokens q, k, v [1, T, n, d] over its cached positions and
        themselves (within the window on sliding layers), except that tokens of one vision block
        (blocks [1, T]) see each other; then k, v are written into the cache."""
        B, cfg = self.backend, self.config
        start = int(cache.lengths[row])
        if cfg.layers[i].kind != SLIDING:            # write first, then read the row in place
            cache.write(i, row, start, k[0], v[0])
            keys, values = cache.read(i, row, 0, start + k.shape[1])
            return B.attention(q, keys[None], values[None], causal_shift=start, window=None, groups=blocks)
        seen = cache.visible(i, start)               # cached positions the first new query can see
        keys, values = cache.read(i, row, start - seen, start)
        out = B.attention(q, B.concat([keys[None], k], 1), B.concat([values[None], v], 1), causal_shift=seen,
                          window=cfg.sliding_window, groups=blocks)
        cache.write(i, row, start, k[0], v[0])       # after reading: the new tokens may overwrite the ring
        return out

    def layer(self, i: int, x: Array, frame: Frame, cache: KVCache) -> Array:
        """One transformer layer (spec §3.3); x [B, T, H] -> [B, T, H]."""
        p = f"layers.{i}."
        n, T, H = x.shape
        attn = self.attention(i, self.norm(x, p + "input_layernorm.weight"), frame, cache)
        x = (x + self.norm(attn, p + "post_attention_layernorm.weight")).reshape(n * T, H)   # tokens [N, H]
        dense = self.norm(self.mlp(self.norm(x, p + "pre_feedforward_layernorm.weight"), p + "mlp."),
                          p + "post_feedforward_layernorm_1.weight")
        weights, ids = self.router(x, p)
        experts = self.norm(self.moe(self.norm(x, p + "pre_feedforward_layernorm_2.weight"), weights, ids, p),
                            p + "post_feedforward_layernorm_2.weight")
        x = x + self.norm(dense + experts, p + "post_feedforward_layernorm.weight")
        scalar = self.weights[ENC_SCALAR.format(i=i)] if frame.contexts is None else self.w(p + "layer_scalar")
        return (x * scalar).reshape(n, T, H)

    def embed(self, ids: Array) -> Array:
        """E[ids] * sqrt(H); ids [...] -> [..., H]."""
        return self.backend.embedding(self.w("embed_tokens.weight"), ids) * self.embed_scale

    def condition(self, scaled_logits: Array) -> Array:
        """The self-conditioning soft embedding of the next step: softmax(scaled) @ E * sqrt(H)
        (spec §3.7), [B, L, V] -> [B, L, H].  The next step's decoder takes it instead of the
        logits, so no [B, L, V] array lives between steps."""
        return self.backend.soft_embedding(scaled_logits, self.w("embed_tokens.weight")) * self.embed_scale

    def self_conditioning(self, e: Array, soft: Array | None) -> Array:
        """Decoder input: rms(embed + SC-MLP(pre_norm(soft))) (spec §3.7).  Without a soft
        embedding (a canvas's first step) only the post-norm remains: pre_norm(0) = 0 and the
        MLP has no biases, so zeros give the same result bit for bit."""
        B = self.backend
        if soft is None:
            return B.rms_norm(e, None, self.config.rms_norm_eps)
        signal = self.mlp(self.norm(soft, "self_conditioning.pre_norm.weight"), "self_conditioning.")
        return B.rms_norm(e + signal, None, self.config.rms_norm_eps)

    # --- the two passes --------------------------------------------------------------------
    def encode(self, ids: np.ndarray, cache: KVCache, rows: Sequence[int],
               images: Sequence[ImagePrompt | None] | None = None) -> None:
        """Causal pass over ids [B, T] (host), row b at positions lengths[rows[b]]..+T-1, appending
        their keys and values to those cache rows; long inputs go in chunks that bound the
        attention scores (chunked prefill).  images: per row, its prompt's images (None: text)."""
        ids = np.asarray(ids, np.int64)
        rows = list(rows)
        layout = (self.image_layout(images, ids.shape)
                  if images and any(image is not None for image in images) else None)
        done = 0
        while done < ids.shape[1]:
            context = int(cache.lengths[rows].max()) + ids.shape[1]              # keys of the last chunk
            step = max(PREFILL_MIN, PREFILL_SCORES // (self.config.num_attention_heads * context))
            stop = done + step if layout is None else chunk_end(layout[2], done, done + step)
            chunk = ids[:, done:stop]
            frame = self.frame(cache, rows, chunk.shape[1], decoder=False)
            x = self.embed(self.backend.asarray(chunk))
            if layout is not None:
                x, frame.blocks = self.place_images(x, layout, done, stop)
            for i in range(self.config.num_hidden_layers):
                x = self.layer(i, x, frame, cache)
            cache.lengths[rows] += chunk.shape[1]
            done += chunk.shape[1]

    def image_layout(self, images: Sequence[ImagePrompt | None], shape: tuple[int, int]
                     ) -> tuple[Array | None, np.ndarray, np.ndarray]:
        """The batch's soft tokens stacked [n, H], and per position [B, T] the row of that stack it
        takes (-1: none) and its vision block (-1: none)."""
        slots, blocks = np.full(shape, -1, np.int64), np.full(shape, -1, np.int64)
        features, offset = [], 0
        for b, image in enumerate(images):
            if image is None:
                continue
            slots[b] = np.where(image.slots >= 0, image.slots + offset, -1)
            blocks[b] = image.blocks
            if image.features is not None:
                features.append(image.features)
                offset += image.features.shape[0]
        return (self.backend.concat(features, 0) if features else None), slots, blocks

    def place_images(self, x: Array, layout: tuple[Array | None, np.ndarray, np.ndarray], start: int,
                     stop: int) -> tuple[Array, list[Array | None]]:
        """Embeddings x [B, t, H] of positions start..stop-1 with the soft tokens put in place of the
        image placeholders (transformers' masked_scatter; soft tokens are not scaled by sqrt(H)),
        and the chunk's vision blocks per row for the attention."""
        B = self.backend
        features, slots, blocks = layout[0], layout[1][:, start:stop], layout[2][:, start:stop]
        taken = slots >= 0
        if taken.any():
            x = B.where(B.asarray(taken[..., None]), features[B.asarray(np.maximum(slots, 0))], x)
        return x, [B.asarray(row[None]) if (row >= 0).any() else None for row in blocks]

    def denoise(self, canvas: Array, frame: Frame, soft: Array | None = None) -> Array:
        """Bidirectional pass over canvases [B, L] (device ids) in a decoder frame -> float32 logits
        [B, L, V], soft-capped.  soft: the self-conditioning input [B, L, H] (`condition` of the
        previous step's scaled logits), None or zeros on a first step."""
        B = self.backend
        x = self.self_conditioning(self.embed(canvas), soft)
        for i in range(self.config.num_hidden_layers):
            x = self.layer(i, x, frame, None)
        logits = B.linear(self.norm(x, "norm.weight"), self.w("embed_tokens.weight"))
        return B.softcap(logits, self.config.final_logit_softcapping)
