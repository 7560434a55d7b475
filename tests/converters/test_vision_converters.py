"""The vision tower through every converter: the GGUF mmproj file (llama.cpp's layout) and a GGUF
text model run with it on the ggml backend against transformers; MLX directories keep it as mlx-vlm
does (mlx-vlm 0.7.10 loads them and agrees with us on an image prompt); FP8 directories keep it
bf16 on the ignore list.  Our readers read all of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import portable_dg
from portable_dg.checkpoint import POSITION_TABLE, VISION_TOWER, expected_vision_tensors
from portable_dg.converters.gguf import convert_to_gguf
from portable_dg.converters.gguf_mmproj import convert_to_mmproj, mmproj_names, read_mmproj
from portable_dg.errors import ConfigError, FormatError
from portable_dg.processor import Processor
from portable_dg.source import open_source
from reference import hf_image_logits, load_hf, pattern
from test_image_processor import synthetic
from tiny import build_tiny_multimodal

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

GEOMETRIES = {"a": "p4k2", "c": "p2k3"}
TEMPERATURE = np.float32(0.8)
TOLERANCE = 1e-4           # the text path's bound; transformers' own float32-vs-float64 distance is below it here


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Factory: checkpoint(name) -> tiny multimodal checkpoint `name` (cached)."""
    made = {}

    def make(name: str = "a"):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"mm_{name}") / "model"
            build_tiny_multimodal(made[name], name, GEOMETRIES[name])
        return made[name]
    return make


def two_images(path):
    """The processor's arrays for two images of different sizes in one prompt."""
    return Processor.from_directory(path)("Compare <|image|> and <|image|>.",
                                          [synthetic(37, 61, seed=1), synthetic(90, 30, seed=2)])


def arrays(prompt) -> dict:
    return dict(pixel_values=prompt.pixel_values, image_position_ids=prompt.image_position_ids,
                mm_token_type_ids=prompt.mm_token_type_ids)


def three_steps(model, prompt, canvas, block) -> list[np.ndarray]:
    """Plain, self-conditioned and after-commit logits of an image prompt."""
    ctx = model.start(prompt.input_ids, **arrays(prompt))
    plain = ctx.denoise(canvas)
    conditioned = ctx.denoise(canvas, self_conditioning=plain / TEMPERATURE)
    ctx.commit(block)
    return [plain, conditioned, ctx.denoise(canvas)]


# --- GGUF: mmproj ------------------------------------------------------------------------------------
def test_mmproj_layout_is_llama_cpps(checkpoint, tmp_path):
    """clip keys with the gemma4v projector and clip.use_gelu, gguf-py's MMPROJ names, the patch
    embedding as the convolution kernel clip.cpp applies (checked by running that convolution),
    the position table F32."""
    from gguf import GGUFReader

    src = checkpoint("a")
    out = convert_to_mmproj(src, tmp_path / "mmproj-F16.gguf", "F16", progress=False)
    reader = GGUFReader(out)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    cfg = open_source(src).config
    v = cfg.vision
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.projector_type"] == fields["clip.vision.projector_type"] == "gemma4v"
    assert fields["clip.use_gelu"] is True and fields["clip.has_vision_encoder"] is True
    assert (fields["clip.vision.projection_dim"], fields["clip.vision.embedding_length"],
            fields["clip.vision.block_count"], fields["clip.vision.projector.scale_factor"]) == (
        cfg.hidden_size, v.hidden_size, v.num_hidden_layers, v.pooling_kernel_size)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(mmproj_names(cfg).values())
    kernel, table = tensors["v.patch_embd.weight"], tensors["v.position_embd.weight"]
    p = v.patch_size
    assert list(kernel.shape) == [p, p, 3, v.hidden_size] and kernel.tensor_type.name == "F16"
    assert list(table.shape) == [v.hidden_size, v.position_embedding_size, 2] and table.tensor_type.name == "F32"
    assert tensors["v.blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["v.blk.0.ln1.weight"].tensor_type.name == "F32"

    image = torch.rand(1, 3, 6 * p, 4 * p)
    conv = torch.nn.functional.conv2d(image, torch.from_numpy(np.array(kernel.data, np.float32)), stride=p)
    patches = image[0].reshape(3, 6, p, 4, p).permute(1, 3, 2, 4, 0).reshape(24, 3 * p * p)   # the processor's rows
    weight = torch.from_numpy(np.array(open_source(src).tensors[VISION_TOWER + "patch_embedder.input_proj.weight"]))
    linear = (patches @ weight.T).T.reshape(v.hidden_size, 6, 4)
    torch.testing.assert_close(conv[0], linear, atol=5e-3, rtol=0)           # F16 kernel


def test_mmproj_round_trip_keeps_every_vision_tensor(checkpoint, tmp_path):
    src = checkpoint("c")
    out = convert_to_mmproj(src, tmp_path / "mmproj-F32.gguf", "F32", progress=False)
    source = open_source(src)
    vision, tensors, processor = read_mmproj(out, source.config)
    assert vision == source.config.vision
    assert set(tensors) == set(expected_vision_tensors(source.config))
    for name, value in tensors.items():
        np.testing.assert_array_equal(np.asarray(value), source.tensors[name], err_msg=name)
    assert processor["max_soft_tokens"] == 70 and processor["pooling_kernel_size"] == 3


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_gguf_with_mmproj_matches_transformers(name, checkpoint, tmp_path):
    """ggml backend, F32 GGUF + F32 mmproj: the three steps of an image prompt."""
    src = checkpoint(name)
    text = convert_to_gguf(src, tmp_path / "model-F32.gguf", "F32", progress=False)
    projector = convert_to_mmproj(src, tmp_path / "mmproj-F32.gguf", "F32", progress=False)
    model = portable_dg.load(text, backend="ggml", mmproj=projector)
    assert model.vision is not None and model.config.image_token_id == open_source(src).config.image_token_id
    prompt = two_images(src)
    hf = load_hf(src)
    L, V = hf.config.canvas_length, hf.config.text_config.vocab_size
    canvas, block = (3 * pattern(L, V) + 1) % V, (5 * np.arange(L) + 3) % V
    theirs = hf_image_logits(hf, vars(prompt), canvas, block, TEMPERATURE)
    ours = three_steps(model, prompt, canvas, block)
    for label, a, b in zip(("plain", "self-conditioned", "after commit"), ours,
                           (theirs.plain, theirs.self_conditioned, theirs.after_commit)):
        assert float(np.abs(a - b).max()) <= TOLERANCE, label


def test_quantized_mmproj_stays_close(checkpoint, tmp_path):
    """Q8_0 matrices (rows that do not fit its blocks fall back to F16): soft tokens near F32's."""
    src = checkpoint("a")
    text = convert_to_gguf(src, tmp_path / "model-F32.gguf", "F32", progress=False)
    prompt = two_images(src)
    features = []
    for quant in ("F32", "Q8_0"):
        projector = convert_to_mmproj(src, tmp_path / f"mmproj-{quant}.gguf", quant, progress=False)
        model = portable_dg.load(text, backend="ggml", mmproj=projector)
        images = model.check_images(prompt.input_ids, **arrays(prompt))
        features.append(model.vision.features(*images.real_patches(0)))
    scale = float(np.abs(features[0]).max())
    assert 0 < float(np.abs(features[1] - features[0]).max()) <= 0.05 * scale


def test_mmproj_errors(checkpoint, tmp_path):
    src_a, src_c = checkpoint("a"), checkpoint("c")
    projector = convert_to_mmproj(src_a, tmp_path / "mmproj.gguf", "F16", progress=False)
    text_c = convert_to_gguf(src_c, tmp_path / "c.gguf", "F16", progress=False)
    with pytest.raises(FormatError, match="maps to width 64, the text model is 80 wide"):
        portable_dg.load(text_c, mmproj=projector)
    with pytest.raises(FormatError, match="not a Gemma 4 vision projector"):
        portable_dg.load(text_c, mmproj=text_c)
    with pytest.raises(FormatError, match="vision projector \\(mmproj\\) file, not a model"):
        portable_dg.load(projector)
    with pytest.raises(ConfigError, match="mmproj type 'Q4_K' is not supported"):
        convert_to_mmproj(src_a, tmp_path / "q4.gguf", "Q4_K", progress=False)
    text_only = tmp_path / "text_only"
    import shutil

    shutil.copytree(src_a, text_only)
    config = json.loads((text_only / "config.json").read_text())
    del config["vision_config"]
    (text_only / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no vision tower"):
        convert_to_mmproj(text_only, tmp_path / "none.gguf", "F16", progress=False)
    assert not (tmp_path / "none.gguf").exists() and not (tmp_path / "q4.gguf").exists()


# --- MLX ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["none", "q4"])
def test_mlx_keeps_the_vision_tower_and_mlx_vlm_agrees(quant, checkpoint, tmp_path):
    """Our MLX directory keeps every vision tensor unquantized under its Hugging Face name; we read
    it with the tower; mlx-vlm 0.7.10 loads it with its tower and gives our logits on an image
    prompt (its tower takes unpadded images [1, 3, H, W], so the patches go back to pixels)."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.utils import load_model

    from portable_dg.converters.mlx import convert_to_mlx

    src = checkpoint("a")
    out = convert_to_mlx(src, tmp_path / quant, quant, 32 if quant != "none" else None, mix="mlx-vlm",
                         progress=False)
    ours, source = portable_dg.load(out), open_source(src)
    assert ours.vision is not None
    for name in expected_vision_tensors(source.config):
        np.testing.assert_array_equal(ours.source.tensors[name], source.tensors[name], err_msg=name)

    prompt = two_images(out)
    canvas = (np.arange(ours.canvas_length) * 5 + 3) % ours.config.vocab_size
    plain = ours.start(prompt.input_ids, **arrays(prompt)).denoise(canvas)
    vlm = load_model(out)
    assert vlm.model.encoder.vision_tower is not None
    p = ours.config.vision.patch_size
    images = []
    for i in range(2):
        pixels, positions = ours.check_images(prompt.input_ids, **arrays(prompt)).real_patches(i)
        width, height = positions.max(0) + 1
        images.append(mx.array(pixels.reshape(height, width, p, p, 3).transpose(4, 0, 2, 1, 3)
                               .reshape(3, height * p, width * p)))
    out_vlm = vlm(input_ids=mx.array(prompt.input_ids)[None], cache=vlm.make_cache(),
                  canvas_ids=mx.array(canvas)[None], pixel_values=images,
                  mm_token_type_ids=mx.array(prompt.mm_token_type_ids)[None])
    assert float(np.abs(np.array(out_vlm.logits[0].astype(mx.float32)) - plain).max()) <= TOLERANCE


# --- FP8 ------------------------------------------------------------------------------------------------
def test_fp8_keeps_the_vision_tower_in_bf16(checkpoint, tmp_path):
    """Every vision tensor bf16 (the source rounded to bf16), none with a weight_scale, all on the
    ignore list; we read the tower, and its soft tokens equal those of the bf16 source."""
    import re

    from portable_dg.checkpoint import f32_to_bf16_bits, open_checkpoint
    from portable_dg.converters.torch_fp8 import convert_fp8

    src = checkpoint("a")
    out = convert_fp8(src, tmp_path / "fp8", progress=False)
    stored, source = open_checkpoint(out), open_checkpoint(src)
    vision = [n for n in source if n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))]
    assert vision and not any(n + "_scale" in stored for n in vision)
    for name in vision:
        assert stored[name].dtype == "BF16"
        np.testing.assert_array_equal(stored[name].raw(), f32_to_bf16_bits(source[name].load()), err_msg=name)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    modules = {n.rsplit(".", 1)[0] for n in vision if n.endswith(".weight")}
    assert all(any(re.match(p[3:], m) for p in ignore if p.startswith("re:")) for m in modules)

    prompt = two_images(src)
    fp8 = portable_dg.load(out, backend="torch", dtype="bfloat16")
    bf16 = portable_dg.load(src, backend="torch", dtype="bfloat16")
    assert fp8.source.format == "fp8" and POSITION_TABLE + ".x" in fp8.source.tensors
    features = [model.vision.features(*model.check_images(prompt.input_ids, **arrays(prompt)).real_patches(1))
                for model in (fp8, bf16)]
    torch.testing.assert_close(features[0], features[1], atol=0, rtol=0)
