"""MLX directories against mlx-vlm itself (the pinned test extra, mlx-vlm 0.7.10): mlx-vlm loads what
`pdg convert --to mlx` writes, from either config form, at every precision and mix, and its logits
agree with ours; we read what mlx-vlm's own converter writes, with the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import portable_dg
from portable_dg.converters.mlx import convert_to_mlx
from portable_dg.synth import tokenizer_json, write_synthetic

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_vlm")

PROMPT = [2, 7, 9, 11, 13, 200, 300, 5, 6, 77]
CANVAS = (np.arange(16) * 5 + 3) % 512          # tiny "a" / synth tiny: canvas 16, vocab 512
TOLERANCE = 1e-4


def vlm_logits(directory: Path, self_conditioning: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mlx-vlm's logits for PROMPT then CANVAS: a plain step and a self-conditioned one."""
    from mlx_vlm.utils import load_model

    model = load_model(directory)                # strict: every weight present, every shape right

    def step(sc: np.ndarray | None) -> np.ndarray:
        out = model(input_ids=mx.array(PROMPT)[None], cache=model.make_cache(), canvas_ids=mx.array(CANVAS)[None],
                    self_conditioning_logits=None if sc is None else mx.array(sc)[None])
        return np.array(out.logits[0].astype(mx.float32))
    return step(None), step(self_conditioning)


def our_logits(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ours (numpy backend) for the same steps; the self-conditioning input is plain / 0.7."""
    ctx = portable_dg.load(directory, backend="numpy").start(PROMPT)
    plain = ctx.denoise(CANVAS)
    return plain, ctx.denoise(CANVAS, plain / 0.7)


def assert_agree(directory: Path) -> None:
    ours = our_logits(directory)
    theirs = vlm_logits(directory, ours[0] / 0.7)
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() <= TOLERANCE


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Synthetic tiny checkpoints (no vision weights) in each config form."""
    root = tmp_path_factory.mktemp("synth")
    return {form: write_synthetic(root / form, "tiny", dtype="f32", form=form) for form in ("transformers", "released")}


@pytest.mark.parametrize("form", ["transformers", "released"])
@pytest.mark.parametrize("quant, mix", [("none", "portable"), ("q8", "portable"), ("q8", "mlx-vlm"),
                                        ("q4", "portable"), ("q4", "mlx-vlm")])
def test_mlx_vlm_loads_our_output(synthetic, tmp_path, form, quant, mix):
    out = convert_to_mlx(synthetic[form], tmp_path / "out", quant, 32 if quant != "none" else None, mix=mix,
                         progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"] is None                     # no vision weights were there to keep
    assert config["text_config"]["global_head_dim"] == 32 and config["text_config"]["num_global_key_value_heads"] == 1
    assert_agree(out)


@pytest.fixture(scope="module")
def with_vision(tiny_dir, tmp_path_factory) -> Path:
    """Tiny "a" as transformers saves it (per_layer_config, vision weights, a generation config
    with nulls) plus a tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "a"
    shutil.copytree(tiny_dir("a"), path)
    (path / "tokenizer.json").write_text(tokenizer_json(512), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    assert None in json.loads((path / "generation_config.json").read_text()).values()
    return path


def test_mlx_vlm_loads_vision_weights_and_generates_with_our_generation_config(with_vision, tmp_path):
    out = convert_to_mlx(with_vision, tmp_path / "q4", "q4", 32, mix="mlx-vlm", progress=False)
    assert json.loads((out / "config.json").read_text())["vision_config"]["model_type"] == "gemma4_vision"
    assert_agree(out)
    from mlx_vlm import generate, load

    model, processor = load(str(out))
    assert model.model.encoder.vision_tower is not None
    result = generate(model, processor, "hello", max_tokens=16, verbose=False)   # fails on null settings
    assert result.generation_tokens > 0


def test_we_read_mlx_vlm_converter_output(with_vision, tmp_path):
    """mlx-vlm's converter needs the released config form; we read its q4 output."""
    from mlx_vlm.convert import convert

    src = tmp_path / "released"
    shutil.copytree(with_vision, src)
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    del text["per_layer_config"]
    text.update(global_head_dim=32, num_global_key_value_heads=1)
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "vlm-q4"
    convert(str(src), str(out), quantize=True, q_bits=4, q_group_size=32)
    source = portable_dg.source.open_source(out)
    assert source.format == "mlx"
    assert source.tensors["model.decoder.layers.0.experts.gate_up_proj"].qtype == "affine4g32"
    assert source.tensors["model.decoder.layers.0.self_attn.q_proj.weight"].qtype == "affine8g64"
    assert_agree(out)
