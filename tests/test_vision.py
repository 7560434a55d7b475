"""Image prompts against transformers 5.23.0 (docs/vision.md §4) on two tiny vision geometries:
the vision tower alone, the plain / self-conditioned / after-commit logits on every backend, and a
free-running deterministic generate; then what only our runtime has: batches mixing image and text
prompts, chunked prefill, prefix reuse keyed on image content, and the refusals of bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import portable_dg
from portable_dg import Engine
from portable_dg.checkpoint import POSITION_TABLE
from portable_dg.errors import CheckpointError, ConfigError
from portable_dg.image_processor import ImageError
from portable_dg.models import diffusion_gemma
from portable_dg.models.diffusion_gemma import chunk_end, vision_blocks
from portable_dg.processor import Processor
from reference import Recording, hf_image_logits, hf_models, load_hf, margins, pattern, pattern_noise
from test_image_processor import synthetic
from test_parity import SAFE_ARGMAX_GAP, SAFE_ENTROPY_GAP, tolerance
from test_vision_oracle import recorded_generate
from tiny import build_tiny_multimodal

torch = pytest.importorskip("torch")

GEOMETRIES = {"a": "p4k2", "c": "p2k3"}     # text config -> vision geometry (patch 4 / kernel 2, patch 2 / kernel 3)
PROMPTS = {
    # two images of different sizes and aspect ratios in one prompt
    "two images": ("Compare <|image|> and <|image|>.", [(37, 61, 1), (90, 30, 2)]),
    # one image with text before and after it
    "text around": ("What is in the picture? <|image|> Describe this image in one sentence.", [(64, 48, 3)]),
}
BACKENDS = {"numpy": {}, "torch": {}, "mlx": {"dtype": "float32"}, "ggml": {}}
TEMPERATURE = np.float32(0.8)


def images_of(specs) -> list:
    return [synthetic(h, w, seed=seed) for h, w, seed in specs]


def image_arrays(prompt) -> dict:
    """`Model.start`'s image keyword arguments from a ProcessedPrompt."""
    return dict(pixel_values=prompt.pixel_values, image_position_ids=prompt.image_position_ids,
                mm_token_type_ids=prompt.mm_token_type_ids)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """Factory: multimodal(name) -> the path of tiny checkpoint `name` with its vision tower (cached)."""
    made = {}

    def make(name: str):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"vision_{name}") / "model"
            build_tiny_multimodal(made[name], name, GEOMETRIES[name])
        return made[name]
    return make


@pytest.fixture(scope="module")
def hf_vision(multimodal):
    """Factory: hf_vision(name, dtype) -> transformers' model of `multimodal(name)` (cached)."""
    return hf_models(multimodal)


@pytest.fixture(scope="module")
def ours(multimodal):
    """Factory: ours(name, backend) -> portable_dg.Model of `multimodal(name)` (cached)."""
    made = {}

    def make(name: str, backend: str = "numpy"):
        if (name, backend) not in made:
            made[name, backend] = portable_dg.load(multimodal(name), backend=backend, **BACKENDS[backend])
        return made[name, backend]
    return make


@pytest.fixture(scope="module")
def processed(multimodal):
    """Factory: processed(name, prompt) -> our processor's ProcessedPrompt of PROMPTS[prompt] (cached)."""
    made = {}

    def make(name: str, prompt: str):
        if (name, prompt) not in made:
            text, specs = PROMPTS[prompt]
            made[name, prompt] = Processor.from_directory(multimodal(name))(text, images_of(specs))
        return made[name, prompt]
    return make


# --- the vision tower alone -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_tower_matches_transformers(name, hf_vision, ours, processed, torch_one_thread):
    """Soft tokens of both images (transformers' get_image_features pooler output) on every backend."""
    prompt = processed(name, "two images")
    pixels, positions = (torch.from_numpy(a) for a in (prompt.pixel_values, prompt.image_position_ids))
    with torch.no_grad():
        hf32, hf64 = (hf_vision(name, dtype).model.encoder.get_image_features(pixels, positions).pooler_output
                      .double().numpy() for dtype in ("float32", "float64"))
    bound = max(1e-5, 4 * float(np.abs(hf32 - hf64).max()))
    for backend in BACKENDS:
        model = ours(name, backend)
        images = model.check_images(prompt.input_ids, **image_arrays(prompt))
        features = np.concatenate([model.backend.to_numpy(model.vision.features(*images.real_patches(i)))
                                   for i in range(len(prompt.num_soft_tokens))])
        assert features.shape == hf32.shape == (sum(prompt.num_soft_tokens), model.config.hidden_size)
        diff = float(np.abs(features - hf32).max())
        assert diff <= bound, f"{backend}: max |soft token diff| {diff:.3g} > {bound:.3g}"


def test_clipped_linears_match_transformers(multimodal, processed, tmp_path, torch_one_thread):
    """Gemma 4's clipped linears (not in DiffusionGemma's release): input and output clamped to
    stored bounds, tight enough here that they clamp."""
    from transformers import DiffusionGemmaForBlockDiffusion

    source = load_hf(multimodal("a"))
    config = source.config
    config.vision_config.use_clipped_linears = True
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    missing, _ = model.load_state_dict(source.state_dict(), strict=False)
    assert missing and all(k.endswith(("_min", "_max")) for k in missing)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                buffer.fill_(-0.5 if "input" in name else -1.5)
            elif name.endswith(("input_max", "output_max")):
                buffer.fill_(0.75 if "input" in name else 1.25)
    shutil.copytree(multimodal("a"), tmp_path / "clipped")
    model.save_pretrained(str(tmp_path / "clipped"))
    prompt = processed("a", "two images")
    with torch.no_grad():
        pixels, positions = (torch.from_numpy(a) for a in (prompt.pixel_values, prompt.image_position_ids))
        theirs = model.model.encoder.get_image_features(pixels, positions).pooler_output.numpy()
        unclipped = source.model.encoder.get_image_features(pixels, positions).pooler_output.numpy()
    ours = portable_dg.load(tmp_path / "clipped")
    images = ours.check_images(prompt.input_ids, **image_arrays(prompt))
    features = np.concatenate([ours.vision.features(*images.real_patches(i)) for i in range(2)])
    assert float(np.abs(theirs - unclipped).max()) > 0.1
    np.testing.assert_allclose(features, theirs, atol=1e-5)


# --- logits (spec §7.2 on an image prompt) --------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_steps(hf_vision, processed):
    """Factory: hf_steps(name, prompt) -> (canvas, block, transformers float32 Steps, the bound)."""
    made = {}

    def make(name: str, prompt: str):
        if (name, prompt) not in made:
            model = hf_vision(name)
            L, V = model.config.canvas_length, model.config.text_config.vocab_size
            canvas, block = (3 * pattern(L, V) + 1) % V, (5 * np.arange(L) + 3) % V
            inputs = vars(processed(name, prompt))
            hf32 = hf_image_logits(model, inputs, canvas, block, TEMPERATURE)
            hf64 = hf_image_logits(hf_vision(name, "float64"), inputs, canvas, block, TEMPERATURE,
                                   self_conditioning=hf32.plain / TEMPERATURE)
            steps = ("plain", "self_conditioned", "after_commit")
            bound = tolerance([getattr(hf32, s) for s in steps], [getattr(hf64, s) for s in steps])
            made[name, prompt] = canvas, block, hf32, bound
        return made[name, prompt]
    return make


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_image_logits_match_transformers(name, backend, prompt, ours, processed, hf_steps, torch_one_thread):
    """Plain, self-conditioned and after-commit steps of an image prompt (the images longer than the
    sliding window: the window is overridden inside them), within the text path's bound."""
    canvas, block, hf32, bound = hf_steps(name, prompt)
    inputs = processed(name, prompt)
    model = ours(name, backend)
    ctx = model.start(inputs.input_ids, **image_arrays(inputs))
    plain = ctx.denoise(canvas)
    conditioned = ctx.denoise(canvas, self_conditioning=plain / TEMPERATURE)
    ctx.commit(block)
    after = ctx.denoise(canvas)
    assert ctx.length == len(inputs.input_ids) + len(block)
    for label, a, b in (("plain", plain, hf32.plain), ("self-conditioned", conditioned, hf32.self_conditioned),
                        ("after commit", after, hf32.after_commit)):
        diff = float(np.abs(a - b).max())
        assert diff <= bound, f"{label} step: max |logit diff| {diff:.3g} > {bound:.3g}"


def test_pixels_and_image_blocks_matter(ours, processed, hf_steps):
    """The parity above would catch a tower or a mask left out: blank pixels, or no vision blocks,
    move the logits far beyond the bound."""
    canvas, _, hf32, bound = hf_steps("a", "two images")
    inputs, model = processed("a", "two images"), ours("a")
    blank = dict(image_arrays(inputs), pixel_values=np.zeros_like(inputs.pixel_values))
    causal = dict(image_arrays(inputs), mm_token_type_ids=np.zeros_like(inputs.mm_token_type_ids))
    for arrays in (blank, causal):
        assert float(np.abs(model.start(inputs.input_ids, **arrays).denoise(canvas) - hf32.plain).max()) > 100 * bound


# --- free-running generate ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, prompt, steps", [("a", "two images", 5), ("c", "two images", 5),
                                                  ("c", "text around", 7)])   # picked for their margins
def test_generate_matches_transformers(name, prompt, steps, hf_vision, ours, processed):
    """Deterministic stand-ins on both sides (pattern noise, argmax sampling): the same ids."""
    hf, inputs = hf_vision(name), processed(name, prompt)
    L, V = hf.config.canvas_length, hf.config.text_config.vocab_size
    options = dict(max_new_tokens=2 * L, max_denoising_steps=steps)
    batch = dict(vars(inputs), input_ids=inputs.input_ids[None], mm_token_type_ids=inputs.mm_token_type_ids[None])
    sequence, calls = recorded_generate(hf, batch, **options)
    recording = Recording(sequence, calls, hf._prepare_generation_config(None, **options)[0], 0.0)
    m = margins(recording)
    assert m.argmax_gap >= SAFE_ARGMAX_GAP and m.entropy_gap >= SAFE_ENTROPY_GAP, m
    out = portable_dg.generate(ours(name), inputs.input_ids, **image_arrays(inputs), noise=pattern_noise(V),
                               greedy=True, **options)
    np.testing.assert_array_equal(out.sequences[0], sequence)
    assert out.steps == recording.passes_per_canvas(len(inputs.input_ids), L)


def test_tower_runs_once_per_request(ours, processed, monkeypatch):
    """At prefill, once per image; never during denoising steps or commits."""
    model, inputs = ours("a"), processed("a", "two images")
    calls = []
    features = model.vision.features
    monkeypatch.setattr(model.vision, "features", lambda *a: (calls.append(1), features(*a))[1])
    out = portable_dg.generate(model, inputs.input_ids, **image_arrays(inputs), seed=0,
                               max_new_tokens=3 * model.canvas_length, max_denoising_steps=4)
    assert len(out.steps) == 3 and len(calls) == 2


# --- batches, chunks, prefix reuse -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_batch_with_image_and_text_prompts_equals_single_runs(backend, ours, multimodal, torch_one_thread):
    """Two image prompts of one length (encoded in one pass, each with its own soft tokens) next to
    a text prompt: each output equals its run alone."""
    model = ours("a", backend)
    processor = Processor.from_directory(multimodal("a"))
    text, specs = PROMPTS["two images"]
    first = processor(text, images_of(specs))
    second = processor(text, images_of([(h, w, seed + 10) for h, w, seed in specs]))
    assert len(first.input_ids) == len(second.input_ids)
    plain = processor("Describe this image in one sentence.")
    settings = dict(noise=pattern_noise(model.config.vocab_size), greedy=True,
                    max_new_tokens=2 * model.canvas_length, max_denoising_steps=5)
    prompts = [first, plain, second]
    batch = portable_dg.generate_batch(model, [p.input_ids for p in prompts], **settings,
                                       pixel_values=[p.pixel_values for p in prompts],
                                       image_position_ids=[p.image_position_ids for p in prompts],
                                       mm_token_type_ids=[p.mm_token_type_ids for p in prompts])
    for prompt, out in zip(prompts, batch):
        alone = portable_dg.generate(model, prompt.input_ids, **image_arrays(prompt), **settings)
        np.testing.assert_array_equal(out.sequences, alone.sequences)
    assert not np.array_equal(batch[0].sequences, batch[2].sequences)


def test_chunk_end_never_splits_a_block():
    blocks = np.array([[-1, -1, 0, 0, 0, 0, -1, 1, 1, -1],
                       [-1, -1, -1, -1, 0, 0, 0, -1, -1, -1]])
    assert chunk_end(blocks, 0, 3) == 2          # back to the start of row 0's first block
    assert chunk_end(blocks, 2, 4) == 7          # the block at the start is longer: to the end of both
    assert chunk_end(blocks, 7, 8) == 9
    assert chunk_end(blocks, 0, 20) == 10
    np.testing.assert_array_equal(vision_blocks(np.array([0, 1, 1, 0, 2, 1, 0, 0, 1])),
                                  [-1, 0, 0, -1, 1, 1, -1, -1, 2])


def test_chunked_prefill_keeps_images_whole(ours, processed, monkeypatch):
    """Prefill in chunks of a few tokens: every chunk boundary falls outside the images, and the
    logits equal one whole-prompt pass."""
    model, inputs = ours("c"), processed("c", "text around")
    canvas = pattern(model.canvas_length, model.config.vocab_size)
    whole = model.start(inputs.input_ids, **image_arrays(inputs)).denoise(canvas)
    monkeypatch.setattr(diffusion_gemma, "PREFILL_SCORES", 1)
    monkeypatch.setattr(diffusion_gemma, "PREFILL_MIN", 5)
    sizes = []
    place = model.network.place_images
    monkeypatch.setattr(model.network, "place_images",
                        lambda x, layout, a, b: (sizes.append((a, b)), place(x, layout, a, b))[1])
    chunked = model.start(inputs.input_ids, **image_arrays(inputs)).denoise(canvas)
    blocks = vision_blocks(inputs.mm_token_type_ids)
    assert len(sizes) > 3 and any(b - a > 5 for a, b in sizes)
    for a, b in sizes:
        assert b == len(blocks) or blocks[b] < 0 or blocks[b] != blocks[b - 1]
    np.testing.assert_allclose(chunked, whole, atol=2e-5)


def test_prefix_reuse_is_keyed_on_image_content(ours, multimodal, monkeypatch):
    """Follow-up prompts after a parked one (same text, same image sizes, so the same ids): with the
    same images the row is reused and the tower does not run; with the last image changed the row
    is reused up to that image and the tower runs for it alone; with the first image changed nothing
    past the text before it is reused.  Each gives what a fresh cache gives."""
    model = ours("a")
    processor = Processor.from_directory(multimodal("a"))
    settings = dict(noise=pattern_noise(model.config.vocab_size), greedy=True,
                    max_new_tokens=model.canvas_length, max_denoising_steps=4)
    extra = processor.tokenizer.encode(" Which one is larger?", add_special_tokens=False)
    calls = []
    features = model.vision.features
    monkeypatch.setattr(model.vision, "features", lambda *a: (calls.append(1), features(*a))[1])

    engine = Engine(model, max_batch=1, prefix_rows=1)
    ids, arrays = two_image_prompt(processor, 1, 2, [])
    engine.submit(ids, **arrays, **settings)
    engine.run()
    for seeds, tower_runs in (((1, 2), 0), ((1, 3), 1), ((4, 3), 2)):
        ids, arrays = two_image_prompt(processor, *seeds, extra)
        calls.clear()
        seq = engine.submit(ids, **arrays, **settings)
        engine.run()
        assert len(calls) == tower_runs
        fresh = portable_dg.generate(model, ids, **arrays, **settings)
        np.testing.assert_array_equal(seq.output.sequences, fresh.sequences)


def two_image_prompt(processor, first_seed: int, second_seed: int, extra: list[int]) -> tuple[np.ndarray, dict]:
    """"Compare <|image|> and <|image|>." + extra ids: a processed first image, and a hand-made second
    image of k x k patches (one soft token), short enough that a prompt differing only in it is
    reused up to it (a cache row is cut back by at most one canvas).  Returns (ids, image arrays)."""
    prompt = processor("Compare <|image|> and <|image|>.", [synthetic(37, 61, seed=first_seed), synthetic(8, 8)])
    k = processor.image_config.pooling_kernel_size
    second = np.flatnonzero(prompt.input_ids == processor.tokens.image_id)[prompt.num_soft_tokens[0]:]
    keep = np.ones(len(prompt.input_ids), bool)
    keep[second[1:]] = False                                   # one placeholder left for the second image
    pixels, positions = prompt.pixel_values.copy(), prompt.image_position_ids.copy()
    pixels[1] = 0
    pixels[1, :k * k] = np.random.default_rng(second_seed).random((k * k, pixels.shape[2]), np.float32)
    positions[1] = -1
    positions[1, :k * k] = [(x, y) for y in range(k) for x in range(k)]
    ids = np.concatenate([prompt.input_ids[keep], extra]).astype(np.int64)
    types = np.concatenate([prompt.mm_token_type_ids[keep], np.zeros(len(extra), np.int64)])
    return ids, dict(pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=types)


# --- bad inputs ---------------------------------------------------------------------------------------
def test_bad_image_arrays_are_refused(ours, processed):
    model, inputs = ours("a"), processed("a", "two images")
    ids, arrays = inputs.input_ids, image_arrays(inputs)
    pixels, positions = inputs.pixel_values, inputs.image_position_ids
    not_a_grid = positions.copy()
    not_a_grid[0, 0] = -1
    far = positions.copy()
    far[0, 0] = (200, 0)
    cases = [
        (dict(arrays, pixel_values=np.concatenate([pixels, pixels[:1]]),
              image_position_ids=np.concatenate([positions, positions[:1]])), "image tokens"),      # more images
        (dict(arrays, pixel_values=pixels[:1], image_position_ids=positions[:1]), "image tokens"),  # fewer
        (dict(arrays, image_position_ids=None), "go together"),
        (dict(arrays, mm_token_type_ids=None), "mm_token_type_ids is required"),
        (dict(arrays, pixel_values=pixels[..., :12]), "pixel_values must be"),
        (dict(arrays, image_position_ids=not_a_grid), "full grid"),
        (dict(arrays, image_position_ids=far), "position table"),
        (dict(arrays, mm_token_type_ids=np.full_like(inputs.mm_token_type_ids, 3)), "no audio"),
        (dict(arrays, mm_token_type_ids=inputs.mm_token_type_ids[:-1]), "one per prompt token"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageError, match=message):
            model.start(ids, **bad)
        with pytest.raises(ImageError, match=message):
            Engine(model).submit(ids, **bad)


def test_a_model_without_vision_tower_refuses_images(multimodal, processed, tmp_path):
    """No vision_config, or a vision_config without vision tensors (a text-only conversion): text
    works, images get one error."""
    from safetensors.numpy import load_file, save_file

    inputs = processed("a", "two images")
    no_config = tmp_path / "no_config"
    shutil.copytree(multimodal("a"), no_config)
    config = json.loads((no_config / "config.json").read_text())
    del config["vision_config"]
    (no_config / "config.json").write_text(json.dumps(config))
    no_tensors = tmp_path / "no_tensors"
    shutil.copytree(multimodal("a"), no_tensors)
    tensors = load_file(no_tensors / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "vision" not in k}, no_tensors / "model.safetensors")
    for path in (no_config, no_tensors):
        model = portable_dg.load(path)
        assert model.vision is None
        model.start(inputs.input_ids)
        with pytest.raises(ConfigError, match="no vision tower"):
            model.start(inputs.input_ids, **image_arrays(inputs))


def test_incomplete_vision_tower_is_refused(multimodal, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(multimodal("a") / "model.safetensors")
    q = "model.encoder.vision_tower.encoder.layers.1.self_attn.q_proj.linear.weight"
    cases = {"missing": ({k: v for k, v in tensors.items() if k != q}, "missing vision tensor .*layers.1.self_attn"),
             "table": ({**tensors, POSITION_TABLE: tensors[POSITION_TABLE][:, :10]},
                       "position_embedding_table.x has shape")}
    for label, (state, message) in cases.items():
        path = tmp_path / label
        shutil.copytree(multimodal("a"), path)
        save_file(state, path / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            portable_dg.load(path)


def test_bad_vision_config_is_refused(multimodal, tmp_path):
    for field, value, message in (("hidden_size", None, "missing field.*hidden_size"),
                                  ("head_dim", 18, "multiple of 4"),
                                  ("rope_parameters", {"rope_type": "default"}, "rope_type")):
        path = tmp_path / field
        shutil.copytree(multimodal("a"), path)
        config = json.loads((path / "config.json").read_text())
        config["vision_config"][field] = value
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=message):
            portable_dg.load(path)
