"""DiffusionGemma, written once against the backend protocol (`portable_dg.backend.Backend`).

The same weights serve two roles (spec §0): a causal *encoder* that reads the prompt and every
committed block into a KV cache, and a bidirectional *decoder* that denoises one canvas of L tokens
placed after the cached context, reading the cache without writing it.  Every backend runs these
lines; a backend only supplies ops and weight storage.

Weights are addressed by their Hugging Face stored names (`model.decoder.*`, plus the encoder's own
`model.encoder.language_model.layers.{i}.layer_scalar`); see `portable_dg.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from portable_dg.backend import Array, Backend
from portable_dg.checkpoint import bf16_to_f32, f32_to_bf16_bits
from portable_dg.config import SLIDING, DiffusionGemmaConfig, LayerGeometry

DEC = "model.decoder."
ENC_SCALAR = "model.encoder.language_model.layers.{i}.layer_scalar"


def rope_inv_freq(g: LayerGeometry) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] float32 for one layer (spec §3.4).

    "default" rotates the whole head; "proportional" keeps int(fraction * d // 2) frequencies with
    the exponent's denominator equal to the full head dim, and zeros (no rotation) elsewhere."""
    d = g.head_dim
    n_rot = int(g.rope_fraction * d // 2)
    exponents = np.arange(0, 2 * n_rot, 2, dtype=np.float32) / np.float32(d)
    rotated = (np.float32(1.0) / (np.float32(g.rope_theta) ** exponents)).astype(np.float32)
    return np.concatenate([rotated, np.zeros(d // 2 - n_rot, np.float32)])


def round_to_dtype(value: float, dtype: str) -> float:
    """A Python float rounded to a float dtype given by name (bfloat16 included: round to nearest even)."""
    if dtype == "bfloat16":
        return float(bf16_to_f32(f32_to_bf16_bits(np.array([value], np.float32)))[0])
    return float(np.dtype(dtype).type(value))


@dataclass
class KVCache:
    """Per-layer keys and values of the encoded context (post-norm, post-RoPE K; post-v_norm V).

    Sliding layers keep only the last `sliding_window - 1` positions after every encoder call, as
    transformers' DynamicCache does (spec §3.5); full layers keep everything."""

    keys: list[Any]
    values: list[Any]
    length: int = 0      # absolute positions encoded so far (P)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        """A cache with nothing encoded."""
        return cls([None] * n_layers, [None] * n_layers)


@dataclass
class DiffusionGemma:
    """The model: `encode` ids into a cache, `denoise` one canvas given the cache."""

    config: DiffusionGemmaConfig
    weights: Mapping[str, Any]
    backend: Backend
    inv_freq: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inv_freq = [rope_inv_freq(g) for g in self.config.layers]
        # sqrt(H) rounded to the compute dtype, as transformers casts it to the embedding dtype.
        self.embed_scale = round_to_dtype(self.config.embed_scale, self.backend.compute_dtype)

    def w(self, name: str) -> Any:
        return self.weights[DEC + name]

    def make_cache(self) -> KVCache:
        """An empty cache for one sequence."""
        return KVCache.empty(self.config.num_hidden_layers)

    # --- building blocks ---------------------------------------------------------------------
    def norm(self, x: Array, name: str | None) -> Array:
        return self.backend.rms_norm(x, None if name is None else self.w(name), self.config.rms_norm_eps)

    def mlp(self, x: Array, prefix: str) -> Array:
        """down(gelu_tanh(gate(x)) * up(x)); x [T, H] -> [T, H]."""
        B = self.backend
        gate = B.linear(x, self.w(prefix + "gate_proj.weight"))
        up = B.linear(x, self.w(prefix + "up_proj.weight"))
        return B.linear(B.gelu_tanh(gate) * up, self.w(prefix + "down_proj.weight"))

    def router(self, x: Array, prefix: str) -> tuple[Array, Array]:
        """Softmax over experts, top-k, renormalise, per-expert gain; x is the raw residual."""
        B, cfg = self.backend, self.config
        z = B.rms_norm(x, None, cfg.rms_norm_eps) * self.w(prefix + "router.scale") * cfg.hidden_size ** -0.5
        probs = B.softmax(B.linear(z, self.w(prefix + "router.proj.weight")))        # [T, E]
        weights, ids = B.top_k(probs, cfg.top_k_experts)                              # [T, k]
        weights = weights / B.sum(weights, -1)[:, None]
        return weights * B.take(self.w(prefix + "router.per_expert_scale"), ids), ids

    def moe(self, x: Array, weights: Array, ids: Array, prefix: str) -> Array:
        """Sum over the k selected experts of weight * down(gelu(gate(x)) * up(x)); -> [T, H]."""
        B, inter = self.backend, self.config.moe_intermediate_size
        gate_up = B.expert_linear(x, self.w(prefix + "experts.gate_up_proj"), ids)  # [T, k, 2I]
        hidden = B.gelu_tanh(gate_up[..., :inter]) * gate_up[..., inter:]           # [T, k, I]
        out = B.expert_linear(hidden, self.w(prefix + "experts.down_proj"), ids)    # [T, k, H]
        return B.sum(out * weights[..., None], 1)

    def attention(self, i: int, x: Array, positions: np.ndarray, cache: KVCache, encode: bool) -> Array:
        """Self-attention of layer i over [cached context ; x]; the encoder also updates the cache."""
        B, cfg, g = self.backend, self.config, self.config.layers[i]
        p = f"layers.{i}.self_attn."
        T, nq, d = x.shape[0], cfg.num_attention_heads, g.head_dim
        q = B.linear(x, self.w(p + "q_proj.weight")).reshape(T, nq, d)
        k_raw = B.linear(x, self.w(p + "k_proj.weight")).reshape(T, g.num_kv_heads, d)
        v = (B.linear(x, self.w(p + "v_proj.weight")).reshape(T, g.num_kv_heads, d)
             if g.has_v_proj else k_raw)                                # full layers: V = raw K
        q = B.rope(self.norm(q, p + "q_norm.weight"), positions, self.inv_freq[i])
        k = B.rope(self.norm(k_raw, p + "k_norm.weight"), positions, self.inv_freq[i])
        v = B.rms_norm(v, None, cfg.rms_norm_eps)
        cached = cache.keys[i] is not None
        keys = B.concat([cache.keys[i], k], 0) if cached else k          # [S, nkv, d]
        values = B.concat([cache.values[i], v], 0) if cached else v
        sliding = g.kind == SLIDING
        if encode:
            shift = keys.shape[0] - T
            out = B.attention(q, keys, values, causal_shift=shift,
                              window=cfg.sliding_window if sliding else None)
            keep = cfg.sliding_window - 1 if sliding else keys.shape[0]
            cache.keys[i], cache.values[i] = keys[-keep:], values[-keep:]
        else:
            out = B.attention(q, keys, values, causal_shift=None, window=None)
        return B.linear(out.reshape(T, nq * d), self.w(p + "o_proj.weight"))

    def layer(self, i: int, x: Array, positions: np.ndarray, cache: KVCache, encode: bool) -> Array:
        """One transformer layer (spec §3.3); x [T, H] -> [T, H]."""
        p = f"layers.{i}."
        attn = self.attention(i, self.norm(x, p + "input_layernorm.weight"), positions, cache, encode)
        x = x + self.norm(attn, p + "post_attention_layernorm.weight")
        dense = self.norm(self.mlp(self.norm(x, p + "pre_feedforward_layernorm.weight"), p + "mlp."),
                          p + "post_feedforward_layernorm_1.weight")
        weights, ids = self.router(x, p)
        experts = self.norm(self.moe(self.norm(x, p + "pre_feedforward_layernorm_2.weight"), weights, ids, p),
                            p + "post_feedforward_layernorm_2.weight")
        x = x + self.norm(dense + experts, p + "post_feedforward_layernorm.weight")
        scalar = self.weights[ENC_SCALAR.format(i=i)] if encode else self.w(p + "layer_scalar")
        return x * scalar

    def embed(self, ids: Array) -> Array:
        """E[ids] * sqrt(H); ids [T] -> [T, H]."""
        return self.backend.embedding(self.w("embed_tokens.weight"), ids) * self.embed_scale

    def self_conditioning(self, e: Array, sc_logits: Array | None) -> Array:
        """Decoder input: rms(embed + SC-MLP(pre_norm(softmax(sc) @ E * sqrt(H)))) (spec §3.7)."""
        B = self.backend
        if sc_logits is None:  # soft embedding 0 -> pre_norm 0 -> MLP 0 (no biases): only the post-norm remains
            return B.rms_norm(e, None, self.config.rms_norm_eps)
        soft = B.soft_embedding(B.softmax(sc_logits), self.w("embed_tokens.weight")) * self.embed_scale
        signal = self.mlp(self.norm(soft, "self_conditioning.pre_norm.weight"), "self_conditioning.")
        return B.rms_norm(e + signal, None, self.config.rms_norm_eps)

    # --- the two passes --------------------------------------------------------------------
    def encode(self, ids: np.ndarray, cache: KVCache) -> None:
        """Causal pass over ids [T] at positions P..P+T-1, appending their K/V to the cache."""
        B = self.backend
        positions = np.arange(cache.length, cache.length + len(ids))
        x = self.embed(B.asarray(np.asarray(ids, np.int64)))
        for i in range(self.config.num_hidden_layers):
            x = self.layer(i, x, positions, cache, encode=True)
        cache.length += len(ids)

    def denoise(self, canvas: Array, cache: KVCache, sc_logits: Array | None = None) -> Array:
        """Bidirectional pass over one canvas [L] (device ids) after the cache -> logits [L, V] float32.

        sc_logits: the previous step's temperature-scaled logits [L, V], or None on a first step."""
        B = self.backend
        positions = np.arange(cache.length, cache.length + canvas.shape[0])
        x = self.self_conditioning(self.embed(canvas), sc_logits)
        for i in range(self.config.num_hidden_layers):
            x = self.layer(i, x, positions, cache, encode=False)
        logits = B.linear(self.norm(x, "norm.weight"), self.w("embed_tokens.weight"))
        return B.softcap(logits, self.config.final_logit_softcapping)
