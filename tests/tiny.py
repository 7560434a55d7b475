"""Tiny DiffusionGemma checkpoints built with transformers (spec §7.1), for tests only.

`TINY_CONFIGS` holds three text configurations that differ in layer pattern, head/KV geometry,
experts/top-k and canvas length.  `build_tiny(path, name)` saves one with `save_pretrained`, with
norms, router scales and layer scalars moved away from their init value 1.0 (which hides bugs).
"""

from __future__ import annotations

from pathlib import Path

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=32, num_hidden_layers=1, patch_size=4,
                   position_embedding_size=64, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)

TINY_CONFIGS = {
    # spec §7.1: sliding/full alternating, window 8, canvas 16
    "a": dict(canvas_length=16, text=dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
        sliding_window=8)),
    # 5:1 pattern like the release, MHA on sliding layers, 8 experts top-3, canvas 8
    "b": dict(canvas_length=8, text=dict(
        vocab_size=384, hidden_size=48, intermediate_size=64, num_hidden_layers=6,
        layer_types=None, num_attention_heads=2, num_key_value_heads=2, head_dim=24,
        global_head_dim=48, num_global_key_value_heads=1, num_experts=8, top_k_experts=3,
        moe_intermediate_size=16, sliding_window=6)),
    # two full layers around a sliding one, GQA 4:1, wider heads, canvas 24, window 16
    "c": dict(canvas_length=24, text=dict(
        vocab_size=640, hidden_size=80, intermediate_size=112, num_hidden_layers=3,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        num_attention_heads=8, num_key_value_heads=2, head_dim=20, global_head_dim=40,
        num_global_key_value_heads=2, num_experts=6, top_k_experts=2, moe_intermediate_size=24,
        sliding_window=16)),
}


def build_tiny(path: str | Path, name: str = "a", seed: int = 0, dtype: str = "float32",
               generation: dict | None = None):
    """Save a tiny random DiffusionGemmaForBlockDiffusion to `path`; returns the torch model."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
    )

    spec = TINY_CONFIGS[name]
    text = {k: v for k, v in spec["text"].items() if v is not None}
    text.update(use_bidirectional_attention="vision", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = DiffusionGemmaConfig(canvas_length=spec["canvas_length"], text_config=text,
                                  vision_config=dict(TINY_VISION))
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "router.scale" in n or "per_expert_scale" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                i = int(n.split("layers.")[1].split(".")[0])
                b.fill_(0.5 + 0.1 * i + (0.05 if ".encoder." in n else 0.0))
    gen = dict(max_new_tokens=2 * spec["canvas_length"], max_denoising_steps=8, eos_token_id=[1],
               pad_token_id=0)
    gen.update(generation or {})
    model.generation_config = DiffusionGemmaGenerationConfig(**gen)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(path))
    return model


def tiny_prompt(length: int, vocab_size: int) -> list[int]:
    """A deterministic prompt: BOS, then `length - 1` ids spread over the vocabulary."""
    return [2] + [(7 * i + 11) % vocab_size for i in range(length - 1)]
