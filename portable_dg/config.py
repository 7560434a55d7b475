"""Model and generation configuration: one dataclass each, shared by every backend.

`DiffusionGemmaConfig.from_dict` takes a Hugging Face `config.json` as it is (either the nested
`text_config` of `diffusion_gemma` or a flat `diffusion_gemma_text` config, with the full-attention
geometry given as `global_head_dim`/`num_global_key_value_heads` or as `per_layer_config`), and
`GenerationConfig.from_dict` takes a `generation_config.json`.  Backends never parse JSON themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")
SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
# Fields every DiffusionGemma config.json must carry: without them we would silently build the
# class defaults, which describe no real checkpoint.
REQUIRED_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                        "top_k_experts", "moe_intermediate_size")
REQUIRED_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "patch_size")


@dataclass
class LayerGeometry:
    """Attention geometry of one layer."""

    kind: str              # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_fraction: float   # partial_rotary_factor of the "proportional" rope; 1.0 for "default"

    @property
    def has_v_proj(self) -> bool:
        """Full-attention layers reuse the raw K projection as V (k_eq_v)."""
        return self.kind == SLIDING


@dataclass
class VisionConfig:
    """The Gemma 4 vision tower (`vision_config`; transformers 5.23.0 `Gemma4VisionConfig`).

    The geometry fields are required; the others default as transformers defaults them (the
    released checkpoint: 1152 wide, 27 layers, 16 heads of 72, patch 16, kernel 3, standardize)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10_240
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    standardize: bool = False
    use_clipped_linears: bool = False

    def __post_init__(self) -> None:
        for name in (*REQUIRED_VISION_FIELDS, "pooling_kernel_size", "position_embedding_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim={self.head_dim} must be a multiple of 4 (two rotate-half RoPEs "
                              "of head_dim / 2, for x and y)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                              "expected 'gelu_pytorch_tanh'")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "vision_config") -> "VisionConfig":
        """Build from config.json's `vision_config`; unknown keys are ignored."""
        missing = [k for k in REQUIRED_VISION_FIELDS if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)} in vision_config")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{source}: vision_config rope_type {rope['rope_type']!r} is not supported; "
                              "expected 'axial'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, ConfigError) as e:
            raise ConfigError(f"{source}: vision_config: {e}") from None


@dataclass
class DiffusionGemmaConfig:
    """The text model plus the block-diffusion settings (defaults: the released 26B-A4B-it)."""

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_experts: int = 128
    top_k_experts: int = 8
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = 2
    per_layer_config: dict[int, dict[str, int]] | None = None
    layer_types: list[str] | None = None
    sliding_window: int = 1024
    rope_parameters: dict[str, dict[str, Any]] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262_144
    final_logit_softcapping: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: str | None = "vision"
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1, 106])
    image_token_id: int = 258_880      # the placeholder the vision tower's soft tokens replace
    vision: VisionConfig | None = None  # config.json's vision_config, when it has one
    layers: list[LayerGeometry] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING
                                for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, "
                              f"expected num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"unknown layer type(s) {bad}; expected {SLIDING!r} or {FULL!r}")
        self.layer_types[-1] = FULL  # transformers forces the last layer to full attention
        if self.use_bidirectional_attention == "all":
            raise ConfigError("use_bidirectional_attention='all' (a bidirectional encoder) is not "
                              "supported; released checkpoints use 'vision'")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                              "expected 'gelu_pytorch_tanh'")
        self.rope_parameters = {**DEFAULT_ROPE, **(self.rope_parameters or {})}
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.layers = [self._geometry(i, kind) for i, kind in enumerate(self.layer_types)]
        for i, g in enumerate(self.layers):
            if self.num_attention_heads % g.num_kv_heads:
                raise ConfigError(f"layer {i}: num_attention_heads={self.num_attention_heads} is not "
                                  f"a multiple of its {g.num_kv_heads} key/value heads")
        if self.top_k_experts > self.num_experts:
            raise ConfigError(f"top_k_experts={self.top_k_experts} exceeds "
                              f"num_experts={self.num_experts}")
        if self.canvas_length <= 0:
            raise ConfigError(f"canvas_length must be positive, got {self.canvas_length}")

    def _geometry(self, i: int, kind: str) -> LayerGeometry:
        overrides = (self.per_layer_config or {}).get(i)
        if overrides is None and kind == FULL and self.per_layer_config is None:
            overrides = {"head_dim": self.global_head_dim}
            if self.num_global_key_value_heads is not None:
                overrides["num_key_value_heads"] = self.num_global_key_value_heads
        overrides = overrides or {}
        rope = self.rope_parameters[kind]
        return LayerGeometry(
            kind=kind,
            head_dim=int(overrides.get("head_dim", self.head_dim)),
            num_kv_heads=int(overrides.get("num_key_value_heads", self.num_key_value_heads)),
            rope_theta=float(rope["rope_theta"]),
            rope_fraction=float(rope.get("partial_rotary_factor", 1.0))
            if rope.get("rope_type", "default") == "proportional" else 1.0,
        )

    @property
    def embed_scale(self) -> float:
        """sqrt(H): the factor applied to token and soft embeddings."""
        return math.sqrt(self.hidden_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "DiffusionGemmaConfig":
        """Build from a Hugging Face config.json dict (nested or flat); unknown keys are ignored."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; "
                              f"expected one of {', '.join(MODEL_TYPES)}")
        text = dict(d.get("text_config") or {}) if model_type == "diffusion_gemma" else dict(d)
        missing = [k for k in REQUIRED_TEXT_FIELDS if text.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)} in "
                              f"{'text_config' if model_type == 'diffusion_gemma' else 'the config'}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in text.items() if k in names and v is not None}
        kwargs.setdefault("num_global_key_value_heads", None)  # transformers' default when absent
        if "per_layer_config" in kwargs:
            kwargs["per_layer_config"] = {int(k): dict(v) for k, v in kwargs["per_layer_config"].items()}
        for key in ("canvas_length", "eos_token_id", "image_token_id"):  # top-level values win over text_config
            if d.get(key) is not None and model_type == "diffusion_gemma":
                kwargs[key] = d[key]
        if isinstance(d.get("vision_config"), dict) and model_type == "diffusion_gemma":
            kwargs["vision"] = VisionConfig.from_dict(d["vision_config"], source)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "DiffusionGemmaConfig":
        """Read a config.json."""
        return cls.from_dict(read_json(path), source=str(path))

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) text parameters, the tied embedding counted once."""
        H, V = self.hidden_size, self.vocab_size
        total = active = V * H + H + 3 * self.intermediate_size * H + H  # embed, norm, SC MLP+norm
        for g in self.layers:
            attn = H * self.num_attention_heads * g.head_dim * 2 + H * g.num_kv_heads * g.head_dim * (
                2 if g.has_v_proj else 1) + 2 * g.head_dim
            dense = 3 * H * self.intermediate_size
            expert = 3 * H * self.moe_intermediate_size
            small = 7 * H + self.num_experts * H + H + self.num_experts + 1
            total += attn + dense + expert * self.num_experts + small
            active += attn + dense + expert * self.top_k_experts + small
        return total, active


@dataclass
class GenerationConfig:
    """Sampler settings; the defaults are the global fallbacks of transformers (spec §1.3)."""

    max_new_tokens: int = 256
    max_length: int | None = None
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on values transformers would reject."""
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        positive_int("max_new_tokens")
        positive_int("max_denoising_steps")
        if self.max_length is not None:
            positive_int("max_length")
        if not self.t_min >= 0 or not self.t_max > self.t_min:
            raise ConfigError(f"temperatures must satisfy t_max > t_min >= 0, got "
                              f"t_min={self.t_min!r}, t_max={self.t_max!r}")
        if not self.entropy_bound >= 0:
            raise ConfigError(f"entropy_bound must be >= 0, got {self.entropy_bound!r}")
        st = self.stability_threshold
        if isinstance(st, bool) or not isinstance(st, int) or st < 0:
            raise ConfigError(f"stability_threshold must be an integer >= 0, got {st!r}")
        if not self.confidence_threshold > 0:
            raise ConfigError(f"confidence_threshold must be > 0, got {self.confidence_threshold!r}")

    def replace(self, **overrides: Any) -> "GenerationConfig":
        """A copy with the non-None overrides applied (and validated)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, d: dict[str, Any], model: DiffusionGemmaConfig | None = None,
                  source: str = "generation_config.json") -> "GenerationConfig":
        """Read a generation_config.json dict; unset fields take the global fallbacks."""
        kwargs = {k: d[k] for k in ("max_new_tokens", "max_length", "max_denoising_steps", "t_min",
                                    "t_max", "stability_threshold", "confidence_threshold",
                                    "eos_token_id", "pad_token_id") if d.get(k) is not None}
        sampler = d.get("sampler_config")
        if isinstance(sampler, dict):
            name = sampler.get("_cls_name", "EntropyBoundSamplerConfig")
            if name != "EntropyBoundSamplerConfig":
                raise ConfigError(f"{source}: sampler_config {name!r} is not supported; "
                                  "expected EntropyBoundSamplerConfig")
            if sampler.get("entropy_bound") is not None:
                kwargs["entropy_bound"] = sampler["entropy_bound"]
        if model is not None:
            kwargs.setdefault("eos_token_id", model.eos_token_id)
            kwargs.setdefault("pad_token_id", model.pad_token_id)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The generation_config.json form."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "entropy_bound"}
        d["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig",
                               "entropy_bound": self.entropy_bound}
        return {k: v for k, v in d.items() if v is not None}


def read_json(path: str | Path) -> dict[str, Any]:
    """Load a JSON object, with errors that name the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
