"""Names of the DiffusionGemma GGUF layout (llama.cpp PR #24423; spec/file_formats.md §1.3-§1.6).

One table maps each canonical tensor name (Hugging Face stored names, `portable_dg.checkpoint`) to
its GGUF name; the metadata keys live here too.  No transposes anywhere: a GGUF `ne` read in
reverse is the HF shape (§1.7).
"""

from __future__ import annotations

import re

ARCH = "diffusion-gemma"                       # PR #24423, the Unsloth files
ARCH_ALIASES = (ARCH, "diffusion-gemma4")      # PR #24427 used "diffusion-gemma4" first

DEC = "model.decoder."
ENC_SCALAR = "model.encoder.language_model.layers.{i}.layer_scalar"

GLOBAL_TENSORS = {
    DEC + "embed_tokens.weight": "token_embd.weight",       # also the LM head (no output.weight)
    DEC + "norm.weight": "output_norm.weight",
    DEC + "self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",  # PR #24427: self_cond_norm
    DEC + "self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    DEC + "self_conditioning.up_proj.weight": "self_cond_up.weight",
    DEC + "self_conditioning.down_proj.weight": "self_cond_down.weight",
}
ROPE_FREQS = "rope_freqs.weight"               # generated; F32 [head_dim_full / 2]
SC_PRE_NORM_ALIASES = ("self_cond_pre_norm.weight", "self_cond_norm.weight")

# HF suffix after `model.decoder.layers.{i}.` -> GGUF suffix after `blk.{i}.`
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",             # sliding layers only
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",  # dense MLP pre-norm
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "router.proj.weight": "ffn_gate_inp.weight",            # F32 always
    "router.scale": "ffn_gate_inp.scale",                   # `.scale`, not `.weight`
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",      # [E, 2I, H], gate rows first
    "experts.down_proj": "ffn_down_exps.weight",            # [E, H, I]
    "router.per_expert_scale": "ffn_down_exps.scale",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",            # decoder (canvas) role
}
ENC_SCALAR_GGUF = "enc_layer_output_scale.weight"           # encoder (prompt) role; absent in PR #24427
SPLIT_EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight")  # accepted instead of the fused tensor

_LAYER_HF = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
_ENC_HF = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a canonical tensor; KeyError for a name the layout does not carry."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    m = _ENC_HF.match(hf_name)
    if m:
        return f"blk.{m.group(1)}.{ENC_SCALAR_GGUF}"
    m = _LAYER_HF.match(hf_name)
    if m and m.group(2) in LAYER_TENSORS:
        return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"
    raise KeyError(hf_name)


def hf_layer_name(i: int, suffix: str) -> str:
    """`model.decoder.layers.{i}.{suffix}`."""
    return f"{DEC}layers.{i}.{suffix}"


class Keys:
    """Metadata keys; `{arch}` is filled with the file's architecture string."""

    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
    EXPERT_COUNT = "{arch}.expert_count"
    EXPERT_USED_COUNT = "{arch}.expert_used_count"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"           # i32 array, one per layer
    KEY_LENGTH = "{arch}.attention.key_length"                 # full layers
    VALUE_LENGTH = "{arch}.attention.value_length"
    KEY_LENGTH_SWA = "{arch}.attention.key_length_swa"         # sliding layers
    VALUE_LENGTH_SWA = "{arch}.attention.value_length_swa"
    SLIDING_WINDOW = "{arch}.attention.sliding_window"
    SLIDING_WINDOW_PATTERN = "{arch}.attention.sliding_window_pattern"  # bool array, true = sliding
    RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    CAUSAL = "{arch}.attention.causal"
    SHARED_KV_LAYERS = "{arch}.attention.shared_kv_layers"
    PER_LAYER_INPUT = "{arch}.embedding_length_per_layer_input"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_DIMENSION_COUNT_SWA = "{arch}.rope.dimension_count_swa"
    FINAL_LOGIT_SOFTCAPPING = "{arch}.final_logit_softcapping"
    VOCAB_SIZE = "{arch}.vocab_size"

    CANVAS_LENGTH = "diffusion.canvas_length"                  # unprefixed; required, > 0
    EB_MAX_STEPS = "diffusion.eb_max_steps"
    EB_T_MIN = "diffusion.eb_t_min"
    EB_T_MAX = "diffusion.eb_t_max"
    EB_ENTROPY_BOUND = "diffusion.eb_entropy_bound"
    EB_STABILITY_THRESHOLD = "diffusion.eb_stability_threshold"
    EB_CONFIDENCE_THRESHOLD = "diffusion.eb_confidence_threshold"
    MAX_NEW_TOKENS = "diffusion.max_new_tokens"                # portable_dg's; llama.cpp ignores it
    EOS_IDS = "tokenizer.ggml.eos_token_ids"                   # every id that ends generation
    SYNTHETIC = "portable_dg.synthetic"                        # bool: random weights (`pdg synth`)


# diffusion.eb_* key -> GenerationConfig field (defaults of llama-diffusion-cli = transformers')
SAMPLER_KEYS = {
    Keys.EB_MAX_STEPS: "max_denoising_steps",
    Keys.EB_T_MIN: "t_min",
    Keys.EB_T_MAX: "t_max",
    Keys.EB_ENTROPY_BOUND: "entropy_bound",
    Keys.EB_STABILITY_THRESHOLD: "stability_threshold",
    Keys.EB_CONFIDENCE_THRESHOLD: "confidence_threshold",
    Keys.MAX_NEW_TOKENS: "max_new_tokens",
}
