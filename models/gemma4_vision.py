"""The Gemma 4 vision tower and its projector into the text model, written once against the backend
protocol (`portable_dg.backend.Backend`).

transformers 5.23.0 `Gemma4VisionModel` + `Gemma4MultimodalEmbedder` (`embed_vision`), step by step
as docs/vision.md §2.3 lists them: patch embedding plus a learned x/y position table, transformer
layers with a 2-D (axial) rotary embedding and bidirectional attention, k x k average pooling of
the patches into soft tokens, scaling by sqrt(D), standardization, a weightless RMS norm and the
projection to the text model's width.

Each image runs on its own, on its real patches only: transformers pads every image to
`max_soft_tokens * k^2` patch rows and masks the padding out of attention and pooling, which
changes nothing but the order of summation; dropping the rows saves their work (a 640 x 480 image
has 2394 real patches of 2520).  Weights are addressed by their Hugging Face stored names under
`model.encoder.`, the position table split into its x and y halves (`checkpoint.vision_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from portable_dg.backend import Array, Backend
from portable_dg.checkpoint import POSITION_TABLE, VISION_PROJECTION, VISION_TOWER
from portable_dg.config import VisionConfig

CLIPPED = ("input_min", "input_max", "output_min", "output_max")


def axial_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies [head_dim / 4] float32 shared by the x and y rotations:
    1 / theta^(2j / (head_dim / 2))."""
    spatial = head_dim // 2
    exponents = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def axial_rope_table(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [P, head_dim] float32 of patch positions [P, 2] (x, y): the angles [fx, fx, fy, fy],
    so that x rotates the first half of a head and y the second (each a rotate-half RoPE)."""
    f = positions.astype(np.float32)[:, :, None] * inv_freq                     # [P, 2, hd/4]
    angle = np.concatenate([f[:, 0], f[:, 0], f[:, 1], f[:, 1]], axis=-1)         # [P, hd]
    return np.cos(angle), np.sin(angle)


def pooling_order(positions: np.ndarray, k: int) -> np.ndarray:
    """The patches [P] reordered so that each k x k block of the patch grid is k^2 consecutive
    rows, blocks in row-major order: transformers' pooling bins floor(x/k) + (width/k) floor(y/k)."""
    width = int(positions[:, 0].max()) + 1
    bins = positions[:, 0] // k + (width // k) * (positions[:, 1] // k)
    return np.argsort(bins, kind="stable")


@dataclass
class Gemma4Vision:
    """The vision tower and projector: `features` turns one image's patches into soft tokens."""

    config: VisionConfig
    weights: Mapping[str, Any]
    backend: Backend
    inv_freq: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inv_freq = axial_inv_freq(self.config.head_dim, self.config.rope_theta)

    def w(self, name: str) -> Any:
        return self.weights[VISION_TOWER + name]

    def features(self, pixels: np.ndarray, positions: np.ndarray) -> Array:
        """Soft tokens of one image, in the text model's width.

        pixels [P, 3 * patch^2] float32 and positions [P, 2] int (x, y) of its real patches (no
        padding rows), a full grid whose sides are multiples of the pooling kernel k ->
        [P / k^2, H_text] in the compute dtype, in row-major order of the pooled grid."""
        B, cfg = self.backend, self.config
        x = B.asarray(2 * (pixels - np.float32(0.5)), compute=True)     # the model's own [-1, 1] scaling
        ids = B.asarray(positions)
        table = POSITION_TABLE[len(VISION_TOWER):]
        h = B.linear(x, self.w("patch_embedder.input_proj.weight")) + (
            B.embedding(self.w(table + ".x"), ids[:, 0]) + B.embedding(self.w(table + ".y"), ids[:, 1]))
        cos, sin = axial_rope_table(positions, self.inv_freq)
        half = cfg.head_dim // 2
        rope = [(B.asarray(c[:, None, part], compute=True), B.asarray(s[:, None, part], compute=True))
                for c, s, part in ((cos, sin, slice(0, half)), (cos, sin, slice(half, None)))]   # [P, 1, hd/2]
        for i in range(cfg.num_hidden_layers):
            h = self.layer(i, h, rope)
        return self.project(self.pool(h, positions))

    def layer(self, i: int, h: Array, rope: list[tuple[Array, Array]]) -> Array:
        """One encoder layer, h [P, D] -> [P, D]."""
        p = f"encoder.layers.{i}."
        h = h + self.norm(self.attention(self.norm(h, p + "input_layernorm.weight"), p + "self_attn.", rope),
                          p + "post_attention_layernorm.weight")
        m = self.mlp(self.norm(h, p + "pre_feedforward_layernorm.weight"), p + "mlp.")
        return h + self.norm(m, p + "post_feedforward_layernorm.weight")

    def mlp(self, u: Array, p: str) -> Array:
        """down(gelu_tanh(gate(u)) * up(u)), u [P, D] -> [P, D]."""
        gate, up, down = (self.linear_of(f"{p}{n}_proj.") for n in ("gate", "up", "down"))
        return down(self.backend.gelu_tanh(gate(u)) * up(u))

    def attention(self, u: Array, p: str, rope: list[tuple[Array, Array]]) -> Array:
        """Bidirectional self-attention over the image's patches, u [P, D] -> [P, D]: q and k
        RMS-normed with weights, v without, 2-D RoPE on q and k, scale 1.0."""
        B, cfg = self.backend, self.config
        P, hd, nq, nkv = u.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = self.norm(self.linear_of(p + "q_proj.")(u).reshape(1, P, nq, hd), p + "q_norm.weight")
        k = self.norm(self.linear_of(p + "k_proj.")(u).reshape(1, P, nkv, hd), p + "k_norm.weight")
        v = B.rms_norm(self.linear_of(p + "v_proj.")(u).reshape(1, P, nkv, hd), None, cfg.rms_norm_eps)
        out = B.attention(self.rotate(q, rope), self.rotate(k, rope), v, causal_shift=None, window=None)
        return self.linear_of(p + "o_proj.")(out.reshape(P, nq * hd))                # [1, P, nq, hd] -> [P, D]

    def rotate(self, x: Array, rope: list[tuple[Array, Array]]) -> Array:
        """x [1, P, n, hd]: the first half rotated by the x positions, the second by the y positions."""
        B, half = self.backend, x.shape[-1] // 2
        (cos_x, sin_x), (cos_y, sin_y) = rope
        return B.concat([B.rope(x[..., :half], cos_x, sin_x), B.rope(x[..., half:], cos_y, sin_y)], -1)

    def linear_of(self, module: str):
        """The product of a `Gemma4ClippableLinear` (its input and output clamped to stored bounds
        when the config says so) as a function of x [..., in]."""
        B, weight = self.backend, self.w(module + "linear.weight")
        if not self.config.use_clipped_linears:
            return lambda x: B.linear(x, weight)
        lo_in, hi_in, lo_out, hi_out = (self.w(module + bound) for bound in CLIPPED)

        def clipped(x: Array) -> Array:
            return clamp(B, B.linear(clamp(B, x, lo_in, hi_in), weight), lo_out, hi_out)
        return clipped

    def norm(self, x: Array, name: str) -> Array:
        return self.backend.rms_norm(x, self.w(name), self.config.rms_norm_eps)

    def pool(self, h: Array, positions: np.ndarray) -> Array:
        """Average each k x k block of patches, h [P, D] -> [P / k^2, D] float32, times sqrt(D),
        standardized when the config says so (float32, as transformers computes it)."""
        B, cfg = self.backend, self.config
        k, D = cfg.pooling_kernel_size, cfg.hidden_size
        order = B.asarray(pooling_order(positions, k))
        pooled = B.mean(h[order].reshape(h.shape[0] // (k * k), k * k, D), 1)        # [n, k^2, D] -> [n, D]
        y = B.to_float32(B.to_compute(pooled)) * D ** 0.5                        # back to wdt, then scaled
        if cfg.standardize:
            y = (y - B.to_float32(self.w("std_bias"))) * B.to_float32(self.w("std_scale"))
        return B.to_compute(y)

    def project(self, y: Array) -> Array:
        """`embed_vision`: weightless RMS norm, then the projection to the text width, [n, D] -> [n, H]."""
        B = self.backend
        return B.linear(B.rms_norm(y, None, self.config.rms_norm_eps), self.weights[VISION_PROJECTION])


def clamp(B: Backend, x: Array, lo: Array, hi: Array) -> Array:
    """x limited to [lo, hi] (scalar arrays)."""
    return B.where(x > hi, hi, B.where(x < lo, lo, x))
