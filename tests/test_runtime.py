"""The public API (`load`, `Model.start`, `Context.denoise`/`commit`): float64 mode, the context
limit, and bad ids, options and backends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import portable_dg
from portable_dg.errors import ConfigError
from tiny import tiny_prompt

V, L = 512, 16          # tiny checkpoint "a"


def test_float64_agrees_with_float32(tiny_model):
    prompt, canvas = tiny_prompt(19, V), (37 * np.arange(L) + 5) % V
    runs = []
    for model in (tiny_model("a"), tiny_model("a", backend="numpy", dtype="float64")):
        ctx = model.start(prompt)
        plain = ctx.denoise(canvas)
        conditioned = ctx.denoise(canvas, self_conditioning=plain / np.float32(0.8))
        ctx.commit(plain.argmax(-1))
        runs.append([plain, conditioned, ctx.denoise(canvas)])
    assert tiny_model("a", backend="numpy", dtype="float64").network.weights[
        "model.decoder.norm.weight"].dtype == np.float64
    for a, b in zip(*runs):
        assert a.dtype == b.dtype == np.float32            # the API returns float32 either way
        assert float(np.abs(a - b).max()) <= 1e-4


def test_context_tracks_positions(tiny_model):
    ctx = tiny_model("a").start(tiny_prompt(5, V))
    assert ctx.length == 5
    ctx.commit(np.arange(L))
    assert ctx.length == 5 + L
    assert tiny_model("a").canvas_length == L


def test_denoise_does_not_write_the_cache(tiny_model):
    ctx = tiny_model("a").start(tiny_prompt(9, V))
    canvas = np.arange(L)
    first = ctx.denoise(canvas)
    ctx.denoise(canvas[::-1].copy())
    assert ctx.length == 9
    np.testing.assert_array_equal(ctx.denoise(canvas), first)


@pytest.fixture(scope="module")
def short_context(tiny_dir, tmp_path_factory):
    """Checkpoint "a" with max_position_embeddings = 40."""
    target = tmp_path_factory.mktemp("short") / "ckpt"
    shutil.copytree(tiny_dir("a"), target)
    config = json.loads((target / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 40
    (target / "config.json").write_text(json.dumps(config))
    return portable_dg.load(target)


def test_prompt_longer_than_the_context(short_context):
    with pytest.raises(ConfigError, match=r"prompt_ids: 41 tokens .* context of 40 positions"):
        short_context.start(tiny_prompt(41, V))


def test_commit_and_canvas_past_the_context(short_context):
    ctx = short_context.start(tiny_prompt(20, V))
    ctx.commit(np.arange(L))                                  # positions 20..35
    with pytest.raises(ConfigError, match="canvas_ids: 16 tokens at position 36 exceed"):
        ctx.denoise(np.arange(L))
    with pytest.raises(ConfigError, match="block_ids: 16 tokens at position 36 exceed"):
        ctx.commit(np.arange(L))
    assert ctx.length == 36


def test_generate_past_the_context(short_context):
    """Checked before any work: prompt + whole canvases must fit."""
    with pytest.raises(ConfigError, match="exceeds the model's context of 40"):
        portable_dg.generate(short_context, tiny_prompt(10, V), max_new_tokens=17)


@pytest.mark.parametrize("ids,words", [
    ([], "empty"),
    ([2, -1, 5], "[0, 512)"),
    ([2, 512], "[0, 512)"),
    ([[1, 2], [3, 4]], "1-D"),
    ([1.5, 2.0], "integer"),
])
def test_bad_prompt_ids(tiny_model, ids, words):
    with pytest.raises(ConfigError) as e:
        tiny_model("a").start(ids)
    assert "prompt_ids" in str(e.value) and words in str(e.value)


def test_bad_canvas_and_self_conditioning(tiny_model):
    ctx = tiny_model("a").start(tiny_prompt(4, V))
    with pytest.raises(ConfigError, match="canvas_ids"):
        ctx.denoise([0, 1, 600])
    with pytest.raises(ConfigError, match=r"self_conditioning must have shape \[16, 512\], got \[16, 511\]"):
        ctx.denoise(np.arange(L), self_conditioning=np.zeros((L, V - 1), np.float32))
    with pytest.raises(ConfigError, match="block_ids"):
        ctx.commit([-3])


@pytest.mark.parametrize("backend,options,words", [
    ("cobol", {}, "unknown backend 'cobol'"),
    ("numpy", {"dtype": "float16"}, "float32 or float64"),
    ("numpy", {"threads": 4}, "unknown option(s) threads"),
])
def test_bad_backend_choice(tiny_a, backend, options, words):
    with pytest.raises(ConfigError) as e:
        portable_dg.load(tiny_a, backend=backend, **options)
    assert words in str(e.value)



def test_long_prompts_are_encoded_in_chunks(tiny_model, monkeypatch):
    """Chunked prefill (a bound on the attention scores per encoder pass) gives the one-pass result."""
    from portable_dg.models import diffusion_gemma

    model = tiny_model("a")
    prompt, canvas = tiny_prompt(150, V), (37 * np.arange(L) + 5) % V
    whole = model.start(prompt).denoise(canvas)
    calls = []
    layer = model.network.layer
    monkeypatch.setattr(diffusion_gemma, "PREFILL_SCORES", 4 * 64 * 40)      # 64-token chunks here
    monkeypatch.setattr(model.network, "layer", lambda i, x, *a: (calls.append(x.shape[1]), layer(i, x, *a))[1])
    chunked = model.start(prompt)
    assert sorted(set(calls)) == [22, 64]                                    # 64 + 64 + 22 tokens
    np.testing.assert_allclose(chunked.denoise(canvas), whole, atol=2e-5)


def test_auto_backend_picks_float32_on_a_cpu_without_bfloat16(monkeypatch):
    """A large bf16 checkpoint on a CPU: torch in bfloat16 only where the CPU multiplies it (or
    float32 copies would not fit), else float32 (torch's bf16 loop is ~10x slower there)."""
    import types

    from portable_dg import backends, runtime

    source = types.SimpleNamespace(format="hf", metadata={"dtypes": ("BF16",)},
                                   config=types.SimpleNamespace(parameter_counts=lambda: (10 ** 9, 10 ** 8)))
    monkeypatch.setattr(runtime, "available_memory", lambda backend: (64 << 30, "host memory"))
    for has_bf16, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(backends, "cpu_has_bf16", lambda: has_bf16)
        assert backends.auto_backend(source) == ("torch", {"dtype": dtype})
    monkeypatch.setattr(runtime, "available_memory", lambda backend: (2 << 30, "host memory"))
    assert backends.auto_backend(source) == ("torch", {"dtype": "bfloat16"})     # float32 would not fit


def test_auto_backend_and_the_memory_check(tiny_a, monkeypatch):
    from portable_dg import runtime

    assert portable_dg.load(tiny_a, backend="auto").backend.name == "numpy"     # small: numpy on a CPU
    monkeypatch.setattr(runtime, "available_memory", lambda backend: (1 << 20, "host memory"))
    with pytest.raises(ConfigError, match=r"need about .* GiB on the numpy backend .* convert to GGUF"):
        portable_dg.load(tiny_a)
    assert portable_dg.load(tiny_a, check_memory=False).backend.name == "numpy"
