"""MLX backend: conformance with the numpy oracle, and the quality of quantized MLX files.

Runs on Linux with `mlx[cpu]` (about 60x slower than BLAS there), so every model is tiny."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import portable_dg  # noqa: E402
from portable_dg.backends.mlx import MLXBackend, QuantizedWeight  # noqa: E402
from portable_dg.converters.mlx import MLXQuantized, convert_to_mlx  # noqa: E402
from portable_dg.runtime import Model  # noqa: E402
from portable_dg.sampler import generate  # noqa: E402
from portable_dg.source import open_source  # noqa: E402

PROMPT = list(range(2, 13))


def canvas(model) -> np.ndarray:
    return (np.arange(model.canvas_length) * 7 + 3) % model.config.vocab_size


def three_passes(model) -> list[np.ndarray]:
    """Canvas logits: plain, self-conditioned, and self-conditioned after a commit."""
    c = canvas(model)
    ctx = model.start(PROMPT)
    plain = ctx.denoise(c)
    conditioned = ctx.denoise(c, plain / 0.6)
    ctx.commit(c)
    return [plain, conditioned, ctx.denoise(c, plain / 0.6)]


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_fp32_logits_match_numpy(tiny_dir, name):
    ref = portable_dg.load(tiny_dir(name), backend="numpy")
    got = portable_dg.load(tiny_dir(name), backend="mlx", dtype="float32")
    for which, a, b in zip(("plain", "self-conditioned", "after commit"), three_passes(ref), three_passes(got)):
        assert np.abs(a - b).max() <= 1e-4, which


@pytest.mark.parametrize("name", ["a", "b"])
def test_greedy_generate_matches_numpy(tiny_dir, name):
    outputs = []
    for backend, options in (("numpy", {}), ("mlx", {"dtype": "float32"})):
        model = portable_dg.load(tiny_dir(name), backend=backend, **options)
        V = model.config.vocab_size
        outputs.append(generate(model, PROMPT, greedy=True, noise=lambda n: (37 * np.arange(n) + 5) % V))
    assert outputs[0].sequences.shape[1] > len(PROMPT)
    np.testing.assert_array_equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].steps == outputs[1].steps


def test_expert_linear_sorted_and_direct_paths_agree():
    """A 256-token canvas takes the sort-by-expert path; it must equal the per-token gather."""
    B = MLXBackend("float32")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 24, 64)).astype(np.float32)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    ids = rng.integers(0, 6, size=(256, 2))
    want = np.einsum("toi,ti->to", w[ids.reshape(-1)], np.repeat(x, 2, axis=0)).reshape(256, 2, 24)
    got = B.to_numpy(B.expert_linear(B.asarray(x), B.weight("w", w), B.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    small = B.to_numpy(B.expert_linear(B.asarray(x[:5]), B.weight("w", w), B.asarray(ids[:5])))
    np.testing.assert_allclose(small, want[:5], atol=1e-4)


def test_quantized_weights_stay_packed(tiny_dir, tmp_path):
    out = convert_to_mlx(tiny_dir("a"), tmp_path / "q4", "q4", 32, progress=False)
    model = portable_dg.load(out, backend="mlx")
    experts = model.network.weights["model.decoder.layers.0.experts.gate_up_proj"]
    assert isinstance(experts, QuantizedWeight) and experts.weight.dtype == mx.uint32
    assert experts.shape == (4, 64, 64) and experts.bits == 4 and experts.group_size == 32


# --- quantized quality -------------------------------------------------------------------------------
# The tiny random checkpoints have near-uniform logits (range ~1 over the vocabulary), which hides
# quantization damage; scaling the tied embedding by 12 gives peaked distributions (range ~11).
# Bounds sit between the measured values (q8 0.27 / 0.54, q4 0.72 / 0.23, mxfp4 1.1 / 0.17) and
# the broken variants (KL >= 2.6, top-1 <= 0.07).
KL_BOUND = {"q8": 0.6, "q4": 1.4, "mxfp4": 2.0}
TOP1_BOUND = {"q8": 0.35, "q4": 0.12, "mxfp4": 0.1}


@pytest.fixture(scope="module")
def sharp(tiny_dir, tmp_path_factory):
    """Tiny "a" with a 12x embedding, and its q8 / q4 / mxfp4 MLX conversions (groups of 32)."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("sharp")
    src = root / "hf"
    shutil.copytree(tiny_dir("a"), src)
    tensors = load_file(src / "model.safetensors")
    tensors = {n: t * 12 if n.endswith("embed_tokens.weight") else t for n, t in tensors.items()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    converted = {q: convert_to_mlx(src, root / q, q, 32, progress=False) for q in KL_BOUND}
    reference = np.concatenate(three_passes(portable_dg.load(src, backend="numpy")))
    return reference, converted


def quality(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || logits) over rows, top-1 agreement)."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = log_softmax(reference), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()), float((reference.argmax(-1) == logits.argmax(-1)).mean())


@pytest.mark.parametrize("quant", list(KL_BOUND))
def test_quantized_quality_within_bounds(sharp, quant):
    reference, converted = sharp
    model = portable_dg.load(converted[quant], backend="mlx", dtype="float32")
    kl, top1 = quality(reference, np.concatenate(three_passes(model)))
    assert kl <= KL_BOUND[quant] and top1 >= TOP1_BOUND[quant], (kl, top1)


def swapped_scale_and_bias(q: MLXQuantized):
    return dataclasses.replace(q, scales=q.biases, biases=q.scales)


def doubled_group_size(q: MLXQuantized):
    """Groups of 32 read as groups of 64 (every other scale/bias)."""
    if q.shape[-1] % 64 or q.group_size != 32:
        return q
    return dataclasses.replace(q, group_size=64, scales=q.scales[..., ::2],
                               biases=None if q.biases is None else q.biases[..., ::2])


def transposed(q: MLXQuantized):
    """The [out, in] data read as if it were stored [in, out]."""
    w = q.dequantize()
    *lead, n_out, n_in = w.shape
    return w.reshape(*lead, n_in, n_out).swapaxes(-1, -2)


@pytest.mark.parametrize("quant, damage", [("q4", swapped_scale_and_bias), ("q4", doubled_group_size),
                                           ("q4", transposed), ("mxfp4", transposed)])
def test_bounds_catch_broken_quantized_weights(sharp, quant, damage):
    reference, converted = sharp
    source = open_source(converted[quant])
    tensors = {n: source.tensors[n] for n in source.tensors}
    tensors = {n: damage(t) if isinstance(t, MLXQuantized) else t for n, t in tensors.items()}
    model = Model(dataclasses.replace(source, tensors=tensors), MLXBackend("float32"))
    kl, top1 = quality(reference, np.concatenate(three_passes(model)))
    assert kl > KL_BOUND[quant] and top1 < TOP1_BOUND[quant], (kl, top1)


def test_bfloat16_float_experts_run_on_the_cpu():
    """Float experts go through gather_mm, whose CPU kernel is float32 only; the default bfloat16
    backend must still run them, and well enough to solve a puzzle the bundled model solves."""
    from portable_dg import sudoku as sd

    model = portable_dg.load(sd.default_model_path(), backend="mlx")
    assert model.backend.compute_dtype == "bfloat16"
    puzzle, solution = sd.test_set(1)[0]
    result = sd.solve(model, puzzle, seed=0)
    assert result.solved, result.problems


def test_compiled_step_generates_what_the_eager_step_does(tiny_a):
    """`compile=True` (mx.compile of the whole step, the default on Apple GPUs) on mlx[cpu]: a
    batch of two prompts over two canvases gives the eager backend's ids and step counts."""
    outs = {}
    for compile in (False, True):
        model = portable_dg.load(tiny_a, backend="mlx", dtype="float32", compile=compile)
        assert model.backend.compile is compile
        outs[compile] = portable_dg.generate_batch(model, [[2, 10, 11], [2, 12, 13, 14, 15]], seed=[0, 1],
                                                   max_new_tokens=2 * model.canvas_length)
    for eager, compiled in zip(outs[False], outs[True]):
        assert np.array_equal(eager.sequences, compiled.sequences) and eager.steps == compiled.steps
