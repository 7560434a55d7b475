"""config.json in both forms, defaults, generation config fallbacks, and bad config files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import portable_dg
from portable_dg.config import FULL, SLIDING, DiffusionGemmaConfig, GenerationConfig
from portable_dg.errors import ConfigError

SMALL_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                  top_k_experts=2, moe_intermediate_size=16)
# The released checkpoint's config.json (written before transformers 5.23): global_head_dim form.
RELEASED_TEXT = dict(model_type="diffusion_gemma_text", vocab_size=262144, hidden_size=2816,
                     intermediate_size=2112, moe_intermediate_size=704, num_experts=128,
                     top_k_experts=8, num_hidden_layers=30, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=256, global_head_dim=512,
                     num_global_key_value_heads=2, sliding_window=1024)


def transformers_config_json(**text) -> dict:
    """config.json as transformers 5.23 writes it (per_layer_config with zero-padded keys)."""
    from transformers import DiffusionGemmaConfig as HFConfig

    return json.loads(HFConfig(text_config=text).to_json_string())


def test_per_layer_config_form_with_zero_padded_keys():
    d = transformers_config_json(**SMALL_TEXT, global_head_dim=32, num_global_key_value_heads=1)
    assert set(d["text_config"]["per_layer_config"]) == {"05", "11"}
    assert "global_head_dim" not in d["text_config"]
    cfg = DiffusionGemmaConfig.from_dict(d)
    for i, g in enumerate(cfg.layers):
        full = i in (5, 11)
        assert g.kind == (FULL if full else SLIDING)
        assert (g.head_dim, g.num_kv_heads, g.has_v_proj) == ((32, 1, False) if full else (16, 2, True))
        assert (g.rope_theta, g.rope_fraction) == ((1e6, 0.25) if full else (1e4, 1.0))


def test_global_head_dim_form_matches_the_release():
    cfg = DiffusionGemmaConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256,
                                          "text_config": RELEASED_TEXT})
    assert [i for i, g in enumerate(cfg.layers) if g.kind == FULL] == [5, 11, 17, 23, 29]
    assert {(g.head_dim, g.num_kv_heads) for g in cfg.layers if g.kind == FULL} == {(512, 2)}
    assert {(g.head_dim, g.num_kv_heads) for g in cfg.layers if g.kind == SLIDING} == {(256, 8)}
    total, active = cfg.parameter_counts()
    assert 25.0e9 < total < 25.5e9 and 3.5e9 < active < 4.0e9    # spec §2.2: 25.25 B, 3.1 B + embedding


def test_both_forms_give_the_same_geometry():
    per_layer = DiffusionGemmaConfig.from_dict(
        transformers_config_json(**SMALL_TEXT, global_head_dim=32, num_global_key_value_heads=1))
    flat = DiffusionGemmaConfig.from_dict({"model_type": "diffusion_gemma", "text_config": dict(
        SMALL_TEXT, global_head_dim=32, num_global_key_value_heads=1)})
    assert per_layer.layers == flat.layers


def test_without_num_global_key_value_heads_full_layers_keep_the_kv_heads():
    """transformers' default for num_global_key_value_heads is None: the sliding KV head count."""
    cfg = DiffusionGemmaConfig.from_dict({"model_type": "diffusion_gemma_text", **SMALL_TEXT,
                                          "global_head_dim": 32})
    assert (cfg.layers[5].head_dim, cfg.layers[5].num_kv_heads) == (32, 2)


def test_final_logit_softcapping_defaults_to_30(tiny_a):
    raw = json.loads((tiny_a / "config.json").read_text())
    assert "final_logit_softcapping" not in raw["text_config"]
    assert DiffusionGemmaConfig.from_file(tiny_a / "config.json").final_logit_softcapping == 30.0


def test_tiny_checkpoint_config(tiny_a):
    cfg = DiffusionGemmaConfig.from_file(tiny_a / "config.json")
    assert (cfg.canvas_length, cfg.vocab_size, cfg.sliding_window) == (16, 512, 8)
    assert [(g.head_dim, g.num_kv_heads) for g in cfg.layers] == [(16, 2), (32, 1), (16, 2), (32, 1)]


def test_generation_config_fallbacks():
    """Unset fields take transformers' global fallbacks; eos/pad come from the model config."""
    model = DiffusionGemmaConfig.from_dict({"model_type": "diffusion_gemma_text", **SMALL_TEXT})
    gen = GenerationConfig.from_dict({}, model)
    assert (gen.max_new_tokens, gen.max_denoising_steps, gen.entropy_bound, gen.t_min, gen.t_max,
            gen.stability_threshold, gen.confidence_threshold) == (256, 48, 0.1, 0.4, 0.8, 1, 0.005)
    assert (gen.eos_token_id, gen.pad_token_id, gen.max_length) == ([1, 106], 0, None)
    gen = GenerationConfig.from_dict({"eos_token_id": 1, "t_min": 0.2,
                                      "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig",
                                                         "entropy_bound": 0.3}}, model)
    assert (gen.eos_token_id, gen.t_min, gen.t_max, gen.entropy_bound) == ([1], 0.2, 0.8, 0.3)


def test_generation_config_of_the_tiny_checkpoint(tiny_a):
    gen = portable_dg.load(tiny_a).generation_config
    assert (gen.max_new_tokens, gen.max_denoising_steps, gen.eos_token_id, gen.pad_token_id) == (32, 8, [1], 0)
    assert (gen.t_min, gen.t_max, gen.entropy_bound) == (0.4, 0.8, 0.1)


def test_generation_config_round_trips():
    gen = GenerationConfig(max_new_tokens=64, entropy_bound=0.2, eos_token_id=[1, 106, 50], pad_token_id=0)
    assert GenerationConfig.from_dict(gen.to_dict()) == gen


@pytest.mark.parametrize("change,words", [
    (dict(model_type="gemma4"), ["model_type", "gemma4"]),
    (dict(text_config=None), ["missing field", "vocab_size"]),
    (dict(text_config={**SMALL_TEXT, "hidden_size": None}), ["missing field", "hidden_size"]),
    (dict(text_config={**SMALL_TEXT, "layer_types": ["full_attention"] * 3}), ["layer_types", "3"]),
    (dict(text_config={**SMALL_TEXT, "layer_types": ["chunked_attention"] * 12}), ["chunked_attention"]),
    (dict(text_config={**SMALL_TEXT, "use_bidirectional_attention": "all"}), ["use_bidirectional_attention"]),
    (dict(text_config={**SMALL_TEXT, "hidden_activation": "relu"}), ["relu"]),
    (dict(text_config={**SMALL_TEXT, "num_key_value_heads": 3}), ["multiple", "3"]),
    (dict(text_config={**SMALL_TEXT, "top_k_experts": 9}), ["top_k_experts"]),
    (dict(canvas_length=0), ["canvas_length"]),
])
def test_bad_model_config(change, words):
    d = {"model_type": "diffusion_gemma", "text_config": dict(SMALL_TEXT), **change}
    with pytest.raises(ConfigError) as e:
        DiffusionGemmaConfig.from_dict(d, source="x/config.json")
    assert all(w in str(e.value) for w in ["x/config.json", *words]), str(e.value)


@pytest.mark.parametrize("change,words", [
    (dict(t_min=0.8, t_max=0.8), ["t_max > t_min"]),
    (dict(t_min=-0.1), ["t_min"]),
    (dict(max_denoising_steps=-1), ["max_denoising_steps"]),
    (dict(max_new_tokens=0), ["max_new_tokens"]),
    (dict(stability_threshold=-1), ["stability_threshold"]),
    (dict(confidence_threshold=0.0), ["confidence_threshold"]),
    (dict(sampler_config={"_cls_name": "TopKSamplerConfig"}), ["TopKSamplerConfig"]),
])
def test_bad_generation_config(change, words):
    with pytest.raises(ConfigError) as e:
        GenerationConfig.from_dict(change, source="x/generation_config.json")
    assert "x/generation_config.json" in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


def edited_copy(tiny_dir, tmp_path, file: str, edit) -> Path:
    """A copy of checkpoint "a" with one JSON file edited (or removed when edit returns None)."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("a"), target)
    data = edit(json.loads((target / file).read_text()))
    if data is None:
        (target / file).unlink()
    else:
        (target / file).write_text(json.dumps(data))
    return target


def snapshot(directory: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize("file,edit,words", [
    ("config.json", lambda d: {**d, "model_type": "llama"}, ["config.json", "model_type", "llama"]),
    ("config.json", lambda d: {**d, "text_config": {k: v for k, v in d["text_config"].items()
                                                    if k != "num_experts"}}, ["config.json", "num_experts"]),
    ("config.json", lambda d: None, ["config.json", "not a model directory"]),
    ("generation_config.json", lambda d: {**d, "t_max": 0.1}, ["generation_config.json", "t_max"]),
])
def test_load_rejects_bad_config_files(tiny_dir, tmp_path, file, edit, words):
    path = edited_copy(tiny_dir, tmp_path, file, edit)
    before = snapshot(path)
    with pytest.raises(portable_dg.PortableDGError) as e:
        portable_dg.load(path)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert snapshot(path) == before


def test_load_rejects_invalid_json(tiny_dir, tmp_path):
    path = edited_copy(tiny_dir, tmp_path, "config.json", lambda d: d)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: invalid JSON"):
        portable_dg.load(path)


def test_missing_generation_config_uses_fallbacks(tiny_dir, tmp_path):
    path = edited_copy(tiny_dir, tmp_path, "generation_config.json", lambda d: None)
    gen = portable_dg.load(path).generation_config
    assert (gen.max_new_tokens, gen.max_denoising_steps, gen.eos_token_id, gen.pad_token_id) == (256, 48, [1], 0)
