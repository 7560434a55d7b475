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


# --- Tiny multimodal checkpoints: a vision tower plus the tokenizer, chat template and processor
# --- config a released checkpoint carries (for the image parity tests).

# Gemma 4's named special tokens, as the release's tokenizer_config.json names them.
GEMMA4_SPECIAL_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>",
}

# The shape of Gemma 4's chat template for text and image parts: a system turn (with <|think|> when
# thinking), turns opened by <|turn>ROLE and closed by <turn|>, text parts trimmed, each image part a
# <|image|> placeholder; images in the system turn are dropped, as the release's template drops them.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ '<|turn>system\\n' }}{%- if enable_thinking -%}{{ '<|think|>\\n' }}{%- endif -%}"
    "{%- if messages[0]['content'] is string -%}{{ messages[0]['content'] | trim }}"
    "{%- else -%}{%- for item in messages[0]['content'] if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endfor -%}{%- endif -%}{{ '<turn|>\\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- elif enable_thinking -%}{{ '<|turn>system\\n<|think|>\\n<turn|>\\n' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|image|>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)

# Two image geometries (patch size, pooling kernel k, soft-token budget) with vision towers to match.
# position_embedding_size covers the longest side a thin image can get: max_soft_tokens * k patches.
TINY_IMAGE_GEOMETRIES = {
    "p4k2": dict(image=dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                             position_embedding_size=160)),
    "p2k3": dict(image=dict(patch_size=2, pooling_kernel_size=3, max_soft_tokens=70),
                 vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=3, num_key_value_heads=3, head_dim=8,
                             position_embedding_size=224)),
}

TINY_CORPUS = ["Describe this image in one sentence.", "What is in the picture? A red square, a blue circle.",
               "Compare the two images and tell me which one is larger.", "hello world, the model denoises"]


def tiny_gemma4_tokenizer():
    """A Gemma-style BPE tokenizer (transformers' GemmaTokenizer, vocabulary about 160) with Gemma 4's
    special tokens and TINY_CHAT_TEMPLATE; ids 0-4 are <pad> <eos> <bos> <unk> <mask>."""
    import json

    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *GEMMA4_SPECIAL_TOKENS.values(), "<|video|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")          # GemmaTokenizer's normalizer
    bpe.train_from_iterator(TINY_CORPUS * 20, trainers.BpeTrainer(vocab_size=160, special_tokens=specials,
                                                                  show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = GemmaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               add_bos_token=False, extra_special_tokens=dict(GEMMA4_SPECIAL_TOKENS),
                               chat_template=TINY_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|video|>"]})
    return tokenizer


def write_tiny_processor(path: str | Path, geometry: str = "p4k2", **image_options) -> None:
    """Save the tokenizer files, chat_template.jinja and processor_config.json (its image_processor
    section written by transformers' Gemma4ImageProcessorPil.to_dict) into `path`."""
    import json

    from transformers.models.gemma4 import Gemma4ImageProcessorPil

    path = Path(path)
    tiny_gemma4_tokenizer().save_pretrained(str(path))
    image = Gemma4ImageProcessorPil(**{**TINY_IMAGE_GEOMETRIES[geometry]["image"], **image_options})
    config = {"image_processor": image.to_dict(), "image_seq_length": image.max_soft_tokens,
              "processor_class": "Gemma4Processor"}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_multimodal(path: str | Path, name: str = "a", geometry: str = "p4k2", seed: int = 0,
                          dtype: str = "float32"):
    """Save a tiny DiffusionGemma with a vision tower of `geometry` and the processor files to `path`.

    The text model is `build_tiny(path, name, seed)`'s; the vision tower has random weights at an
    O(1) scale, random position embeddings and standardization (std_bias, std_scale), like the
    release (which standardizes and has no clipped linears).  Returns the torch model."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text_model = build_tiny(path, name, seed=seed)
    write_tiny_processor(path, geometry)
    tokenizer = tiny_gemma4_tokenizer()
    ids = {key: tokenizer.convert_tokens_to_ids(GEMMA4_SPECIAL_TOKENS[token])
           for key, token in (("image_token_id", "image_token"), ("boi_token_id", "boi_token"),
                              ("eoi_token_id", "eoi_token"))}
    geo = TINY_IMAGE_GEOMETRIES[geometry]
    vision = dict(model_type="gemma4_vision", patch_size=geo["image"]["patch_size"],
                  pooling_kernel_size=geo["image"]["pooling_kernel_size"], standardize=True,
                  use_clipped_linears=False, **geo["vision"])
    config = DiffusionGemmaConfig(canvas_length=text_model.config.canvas_length,
                                  text_config=text_model.config.text_config.to_dict(),
                                  vision_config=vision, **ids)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    multimodal = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
    text_state = {k: v for k, v in text_model.state_dict().items() if not k.startswith(multimodal)}
    missing, unexpected = model.load_state_dict(text_state, strict=False)
    assert not unexpected and all(k.startswith(multimodal) for k in missing), (missing, unexpected)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in [*model.model.encoder.vision_tower.named_parameters(prefix="vision"),
                     *model.model.encoder.embed_vision.named_parameters(prefix="embed")]:
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        tower = model.model.encoder.vision_tower
        tower.std_bias.copy_(0.1 * torch.randn(tower.std_bias.shape, generator=generator))
        tower.std_scale.copy_(1 + 0.2 * torch.randn(tower.std_scale.shape, generator=generator))
    model.generation_config = text_model.generation_config
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(path))
    return model
