"""Synthetic checkpoints: random weights in the Hugging Face DiffusionGemma layout, for benchmarks and tests.

`write_synthetic(out, like="mini")` writes config.json (marked `"portable_dg_synthetic": true`),
generation_config.json, a small byte-level tokenizer and sharded safetensors that both
transformers 5.23 and `portable_dg.load` read.  Tensors are generated and written in row chunks
straight into the shard files (header first, its offsets computed from the shapes), so even the
released shapes (about 50 GB in bf16) need no more memory than one chunk.

Weights are random but not degenerate: linears ~ N(0, 1/fan_in), the embedding ~ N(0, 1/H), every
norm weight, router scale and per-expert scale 1 + 0.2 N(0, 1) (q/k norms scaled by d^-1/4, see
`tensor_plan`), and distinct layer scalars, so a wrong norm, scale or layer wiring changes the
logits (spec §7.1) while activations stay of unit size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .checkpoint import expected_tensors
from .config import FULL, SLIDING, DiffusionGemmaConfig
from .errors import ConfigError
from .outputs import check_new_directory, output_directory
from .progress import Progress
from .safetensors_writer import Entry, f32_to_bf16_bits, split_shards, write_index, write_safetensors

MAX_SHARD_BYTES = 5 * 10**9          # transformers' max_shard_size="5GB"
CHUNK_ELEMENTS = 16 << 20            # rows are generated and written ~64 MB (float32) at a time
SAFETENSORS_DTYPE = {"bf16": "BF16", "f32": "F32"}
ITEMSIZE = {"bf16": 2, "f32": 4}
# Special tokens at their Gemma 4 ids (spec §5); the rest of the vocabulary is byte-level BPE
# tokens and then padding up to vocab_size.
SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
                  50: "<|tool_response>", 105: "<|turn>", 106: "<turn|>"}
# Gemma 4's turn format; the assistant's turns are "model" turns, as in Gemma's own template, so a
# conversation's next prompt extends the previous one (prefix reuse).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|turn>"
                 "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                 "{{ message['content'] }}<turn|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|turn>model\n{% endif %}")
# transformers always builds a vision tower; this 1-layer toy keeps that cheap (spec §7.1).  The
# synthetic checkpoint stores no vision weights (portable_dg is text-only).
TOY_VISION = dict(model_type="gemma4_vision", hidden_size=32, num_hidden_layers=1, patch_size=4,
                  position_embedding_size=64, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)

RELEASED_TEXT = dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112,
                     moe_intermediate_size=704, num_experts=128, top_k_experts=8, num_hidden_layers=30,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                     num_global_key_value_heads=2, sliding_window=1024,
                     max_position_embeddings=262_144)
RELEASED_GENERATION = dict(max_new_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8,
                           stability_threshold=1, confidence_threshold=0.005,
                           eos_token_id=[1, 106, 50], pad_token_id=0)

PRESETS: dict[str, dict[str, Any]] = {
    # spec §1 shapes: 30 layers (5 sliding : 1 full), 128 experts top-8, vocab 262144, canvas 256
    "released": dict(canvas_length=256, text=RELEASED_TEXT, generation=RELEASED_GENERATION),
    # the released width and heads with 2 layers (one sliding, one full), 32 experts top-8 and a
    # 32768 vocabulary: realistic matrix shapes, about 0.58 B parameters (1.2 GB in bf16)
    "mini": dict(canvas_length=256, text={**RELEASED_TEXT, "num_hidden_layers": 2, "num_experts": 32,
                                          "vocab_size": 32_768},
                 generation=RELEASED_GENERATION),
    # tests/tiny.py "a" (spec §7.1): 4 layers of width 64, canvas 16
    "tiny": dict(canvas_length=16, text=dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        top_k_experts=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=8,
        max_position_embeddings=131_072, layer_types=[SLIDING, FULL, SLIDING, FULL]),
        generation=dict(max_new_tokens=32, max_denoising_steps=8, t_min=0.4, t_max=0.8,
                        stability_threshold=1, confidence_threshold=0.005, eos_token_id=[1],
                        pad_token_id=0)),
}
CONFIG_FORMS = ("transformers", "released")
MIN_VOCAB = 512  # room for the special tokens at their Gemma ids and the 256 byte tokens


@dataclass
class TensorPlan:
    """One tensor to write: its stored name, shape and how to draw its values."""

    name: str
    shape: tuple[int, ...]
    kind: str        # "linear" (N(0, 1/fan_in)), "embedding" (N(0, 1/H)), "gain", "scalar"
    value: float = 0.0  # a "scalar"'s value; a "gain"'s centre (values are value * (1 + 0.2 N))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def text_config(like: str, layers: int | None = None, vocab: int | None = None) -> dict[str, Any]:
    """The preset's text_config fields (layer_types included) with the overrides applied."""
    if like not in PRESETS:
        raise ConfigError(f"unknown preset {like!r}; expected one of {', '.join(PRESETS)}")
    text = dict(PRESETS[like]["text"])
    if layers is not None:
        if layers <= 0:
            raise ConfigError(f"--layers must be positive, got {layers}")
        text["num_hidden_layers"] = layers
        text.pop("layer_types", None)
    if vocab is not None:
        if vocab < MIN_VOCAB:
            raise ConfigError(f"--vocab must be at least {MIN_VOCAB} (special tokens at their Gemma ids "
                              f"plus 256 byte tokens), got {vocab}")
        text["vocab_size"] = vocab
    n = text["num_hidden_layers"]
    types = text.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
    text["layer_types"] = types[:-1] + [FULL]  # transformers forces the last layer to full attention
    return text


def config_json(like: str, text: dict[str, Any], form: str, dtype: str) -> dict[str, Any]:
    """config.json: the transformers 5.23 form (`per_layer_config`) or the released form
    (`global_head_dim` / `num_global_key_value_heads`)."""
    if form not in CONFIG_FORMS:
        raise ConfigError(f"unknown config form {form!r}; expected one of {', '.join(CONFIG_FORMS)}")
    text = {**text, "model_type": "diffusion_gemma_text", "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": True,
            "use_bidirectional_attention": "vision", "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2, "final_logit_softcapping": 30.0,
            "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                       "rope_theta": 1_000_000.0}}}
    if form == "transformers":
        full = {"head_dim": text.pop("global_head_dim"),
                "num_key_value_heads": text.pop("num_global_key_value_heads")}
        width = len(str(text["num_hidden_layers"] - 1))
        text["per_layer_config"] = {str(i).zfill(width): dict(full)
                                    for i, kind in enumerate(text["layer_types"]) if kind == FULL}
    generation = PRESETS[like]["generation"]
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": PRESETS[like]["canvas_length"], "text_config": text,
            "vision_config": dict(TOY_VISION), "tie_word_embeddings": True,
            "boi_token_id": 255_999, "eoi_token_id": 258_882, "image_token_id": 258_880,
            "eos_token_id": [t for t in generation["eos_token_id"] if t in (1, 106)],
            "dtype": {"bf16": "bfloat16", "f32": "float32"}[dtype], "transformers_version": "5.23.0",
            "portable_dg_synthetic": True}


def generation_json(like: str) -> dict[str, Any]:
    """generation_config.json of the preset (the released sampler settings, or tiny's short ones)."""
    g = dict(PRESETS[like]["generation"])
    g["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}
    g["return_dict_in_generate"] = True
    g["transformers_version"] = "5.23.0"
    return g


def tensor_plan(config: DiffusionGemmaConfig) -> list[TensorPlan]:
    """Every stored text tensor of a checkpoint with this config, with how to initialise it."""
    n = config.num_hidden_layers
    plan = []
    for name, shape in sorted(expected_tensors(config).items()):
        if name.endswith("layer_scalar"):
            i = int(name.split("layers.")[1].split(".")[0])
            # distinct per layer, equal in the encoder and decoder copies (as reported for the release)
            plan.append(TensorPlan(name, shape, "scalar", 0.5 + 0.5 * (i + 1) / (n + 1)))
        elif name.endswith("embed_tokens.weight"):
            plan.append(TensorPlan(name, shape, "embedding"))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            # attention has scale 1.0 (spec §3.4): gains of d^-1/4 on q and k give scores of unit
            # variance, as 1/sqrt(d) would; gains near 1 make every head a near-hard argmax
            plan.append(TensorPlan(name, shape, "gain", shape[0] ** -0.25))
        elif len(shape) == 1:
            plan.append(TensorPlan(name, shape, "gain", 1.0))
        else:
            plan.append(TensorPlan(name, shape, "linear"))
    return plan


def tensor_chunks(t: TensorPlan, index: int, seed: int) -> Iterator[np.ndarray]:
    """The tensor's values as float32 row chunks along axis 0 (reproducible for a given seed)."""
    rng = np.random.default_rng([seed, index])
    if t.kind == "scalar":
        yield np.full(t.shape, t.value, np.float32)
        return
    if t.kind == "gain":
        yield (t.value * (1.0 + 0.2 * rng.standard_normal(t.shape, dtype=np.float32))).astype(np.float32)
        return
    std = np.float32(1.0 / np.sqrt(t.shape[-1]))   # fan_in for linears, H for the embedding
    row = t.numel // t.shape[0]
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row)
    for start in range(0, t.shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, t.shape[0] - start)
        yield rng.standard_normal((rows, *t.shape[1:]), dtype=np.float32) * std


def shard_groups(plan: list[TensorPlan], dtype: str, max_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorPlan]]:
    """Split the tensors, in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    return split_shards(plan, lambda t: t.numel * ITEMSIZE[dtype], max_bytes)


def entries(tensors: list[TensorPlan], dtype: str) -> list[Entry]:
    """The stored entries of a group of planned tensors."""
    return [Entry(t.name, SAFETENSORS_DTYPE[dtype], tuple(t.shape)) for t in tensors]


def write_shard(path: Path, tensors: list[TensorPlan], indices: dict[str, int], dtype: str,
                seed: int, progress: Progress) -> None:
    """Write one safetensors file: header, then each tensor's chunks in header order."""
    def chunks() -> Iterator[np.ndarray]:
        for t in tensors:
            for chunk in tensor_chunks(t, indices[t.name], seed):
                yield f32_to_bf16_bits(chunk) if dtype == "bf16" else chunk
                progress.update(chunk.size * ITEMSIZE[dtype])
    write_safetensors(path, entries(tensors, dtype), chunks())


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer (no merges: one token per byte) with the Gemma special tokens
    at their ids, padded with unreachable `<unusedN>` entries up to vocab_size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {text: i for i, text in SPECIAL_TOKENS.items()}
    free = (i for i in range(vocab_size) if i not in SPECIAL_TOKENS)
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = next(free)
    for i in free:
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False)
                            for _, text in sorted(SPECIAL_TOKENS.items())])
    return tok.to_str()


def write_synthetic(out: str | Path, like: str = "mini", *, layers: int | None = None,
                    vocab: int | None = None, dtype: str = "bf16", seed: int = 0,
                    form: str = "transformers", max_shard_bytes: int = MAX_SHARD_BYTES,
                    progress: bool = False) -> Path:
    """Write a synthetic checkpoint directory at `out` (which must not exist or be empty).

    Everything goes to a temporary directory next to `out`, renamed into place when complete
    (`portable_dg.outputs.output_directory`); `progress` reports the bytes written on stderr."""
    if dtype not in SAFETENSORS_DTYPE:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(SAFETENSORS_DTYPE)}")
    out = check_new_directory(out)
    text = text_config(like, layers, vocab)
    config = config_json(like, text, form, dtype)
    model_config = DiffusionGemmaConfig.from_dict(config, source=f"preset {like}")
    plan = tensor_plan(model_config)
    indices = {t.name: i for i, t in enumerate(plan)}
    shards = shard_groups(plan, dtype, max_shard_bytes)
    total = sum(t.numel for t in plan) * ITEMSIZE[dtype]
    with output_directory(out) as tmp, Progress(total, f"synth {out.name} ({like})", enabled=progress) as bar:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        for name, group in zip(names, shards):
            write_shard(tmp / name, group, indices, dtype, seed, bar)
        if len(shards) > 1:
            write_index(tmp, [(name, entries(group, dtype)) for name, group in zip(names, shards)])
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation_json(like))
        (tmp / "tokenizer.json").write_text(tokenizer_json(text["vocab_size"]), encoding="utf-8")
        write_json(tmp / "tokenizer_config.json", {"bos_token": "<bos>", "eos_token": "<eos>",
                                                   "pad_token": "<pad>", "unk_token": "<unk>"})
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def describe(like: str, layers: int | None = None, vocab: int | None = None, dtype: str = "bf16",
             form: str = "transformers") -> dict[str, Any]:
    """What `write_synthetic` would write, without writing it: tensor count, bytes, shards."""
    if dtype not in SAFETENSORS_DTYPE:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(SAFETENSORS_DTYPE)}")
    config = config_json(like, text_config(like, layers, vocab), form, dtype)
    model_config = DiffusionGemmaConfig.from_dict(config, source=f"preset {like}")
    plan = tensor_plan(model_config)
    return {"preset": like, "layers": model_config.num_hidden_layers, "vocab": model_config.vocab_size,
            "tensors": len(plan), "parameters": sum(t.numel for t in plan),
            "bytes": sum(t.numel for t in plan) * ITEMSIZE[dtype],
            "shards": len(shard_groups(plan, dtype)), "config": config}
