"""The ggml backend against the numpy reference: every protocol op, the tiny checkpoints (HF
directory and GGUF files), quantized products, and bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")

import portable_dg  # noqa: E402
from portable_dg.backends.ggml import create  # noqa: E402
from portable_dg.backends.ggml.engine import quantize  # noqa: E402
from portable_dg.backends.numpy import NumpyBackend  # noqa: E402
from portable_dg.errors import BackendUnavailable, CheckpointError, ConfigError  # noqa: E402
from portable_dg.sampler import generate  # noqa: E402

REF = NumpyBackend()
# The two routes of F32 products: ggml throughout, and numpy's BLAS.
ROUTES = {"ggml": 10 ** 9, "blas": 1}


@pytest.fixture(scope="module", params=list(ROUTES))
def backend(request):
    return create(n_threads=2, device="cpu", blas_min_tokens=ROUTES[request.param])


def rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


# --- products -------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,out,n", [(1, 8, 32), (7, 24, 64), (40, 33, 96)])
def test_linear_and_embedding_f32(backend, T, out, n):
    x, w = rand(T, n), rand(out, n, seed=1)
    W = backend.weight("w", w)
    np.testing.assert_allclose(backend.linear(x, W), REF.linear(x, w), rtol=1e-5, atol=1e-5)
    ids = np.array([0, out - 1, 3, 3])
    np.testing.assert_array_equal(backend.embedding(W, ids), w[ids])
    probs = REF.softmax(rand(T, out, seed=2))
    np.testing.assert_allclose(backend.soft_embedding(probs, W), REF.soft_embedding(probs, w), rtol=1e-5, atol=1e-6)


def test_float16_weights(backend):
    x, w = rand(40, 64), rand(16, 64, seed=1).astype(np.float16)
    # ggml rounds the activations to f16 for an F16 weight: compare at f16 precision
    np.testing.assert_allclose(backend.linear(x, backend.weight("w", w)), x @ w.astype(np.float32).T,
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shared_input", [True, False])
def test_expert_linear_f32(backend, shared_input):
    E, out, n, T, k = 5, 12, 32, 40, 2
    w = rand(E, out, n, seed=3)
    ids = np.random.default_rng(4).permuted(np.tile(np.arange(E), (T, 1)), axis=1)[:, :k]
    x = rand(T, n) if shared_input else rand(T, k, n)
    np.testing.assert_allclose(backend.expert_linear(x, backend.weight("w", w), ids),
                               REF.expert_linear(x, w, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_quantized_products_match_an_independent_dequantization(backend, qtype):
    """Stored blocks stay blocks; products agree with gguf-py's numpy dequantization (ggml rounds
    the activations to 8 bits for a quantized weight; the soft lookup dequantizes exactly)."""
    gguf = pytest.importorskip("gguf")
    t = getattr(ggml, f"GGML_TYPE_{qtype}")
    E, out, n, T = 3, 24, 256, 40
    w = rand(E, out, n, seed=5)
    blocks = quantize(w, t).reshape(E, out, -1)
    dense = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(t)).reshape(E, out, n)

    class Stored:       # the GGUF reader's tensor contract: shape, ggml_type, raw data
        shape, ggml_type, data = (E, out, n), t, blocks

    W = backend.weight("experts", Stored)
    ids = np.stack([np.arange(T) % E, (np.arange(T) + 1) % E], axis=1)
    x = rand(T, n)
    expected = REF.expert_linear(x, dense, ids)
    got = backend.expert_linear(x, W, ids)
    assert np.linalg.norm(got - expected) <= 2e-2 * np.linalg.norm(expected)
    Stored.shape, Stored.data = (E * out, n), blocks.reshape(E * out, -1)
    W2 = backend.weight("dense", Stored)
    expected = x @ dense.reshape(E * out, n).T
    assert np.linalg.norm(backend.linear(x, W2) - expected) <= 2e-2 * np.linalg.norm(expected)
    np.testing.assert_allclose(backend.embedding(W2, np.array([2, 70])), dense.reshape(-1, n)[[2, 70]], atol=1e-6)
    logits = rand(T, E * out, seed=6)
    np.testing.assert_allclose(backend.soft_embedding(logits, W2), REF.softmax(logits) @ dense.reshape(E * out, n),
                               rtol=1e-4, atol=1e-6)


# --- the inherited numpy ops still behave --------------------------------------------------------

@pytest.mark.parametrize("causal_shift,window", [(None, None), (0, None), (3, None), (3, 4)])
def test_attention(backend, causal_shift, window):
    q, k, v = rand(2, 5, 4, 8), rand(2, 8, 2, 8, seed=1), rand(2, 8, 2, 8, seed=2)
    np.testing.assert_allclose(backend.attention(q, k, v, causal_shift=causal_shift, window=window),
                               REF.attention(q, k, v, causal_shift=causal_shift, window=window), rtol=1e-6)


def test_elementwise_and_sampler_ops(backend):
    x = rand(6, 10)
    cos, sin = np.cos(x).reshape(6, 1, 10), np.sin(x).reshape(6, 1, 10)
    u = np.linspace(0, 0.99, 6).astype(np.float32)
    checks = {
        "rms_norm": (backend.rms_norm(x, x[0], 1e-6), REF.rms_norm(x, x[0], 1e-6)),
        "rope": (backend.rope(x.reshape(6, 1, 10), cos, sin), REF.rope(x.reshape(6, 1, 10), cos, sin)),
        "gelu": (backend.gelu_tanh(x), REF.gelu_tanh(x)),
        "softmax": (backend.softmax(x), REF.softmax(x)),
        "softcap": (backend.softcap(x.copy(), 3.0), REF.softcap(x.copy(), 3.0)),
        "top_k": (backend.top_k(x, 3)[1], REF.top_k(x, 3)[1]),
        "token_stats": (np.stack(backend.token_stats(x, u)), np.stack(REF.token_stats(x, u))),
    }
    for name, (got, want) in checks.items():
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    assert backend.asarray(np.arange(3)).dtype == np.int64 and backend.asarray(x).dtype == np.float32


# --- whole model ------------------------------------------------------------------------------------

def canvas_logits(model, seed=0):
    """Logits of a first and a self-conditioned second denoising step after a 12-token prompt."""
    rng = np.random.default_rng(seed)
    V, L = model.config.vocab_size, model.canvas_length
    ctx = model.start(rng.integers(0, V, 12))
    canvas = rng.integers(0, V, L)
    first = ctx.denoise(canvas)
    return np.concatenate([first, ctx.denoise(canvas, first / 0.8)])


def greedy(model):
    V = model.config.vocab_size
    return generate(model, [5, 6, 7], greedy=True, noise=lambda n: (37 * np.arange(n) + 5) % V,
                    max_new_tokens=2 * model.canvas_length).sequences


@pytest.mark.parametrize("name,route", [("a", "ggml"), ("a", "blas"), ("c", "ggml")])
def test_hf_checkpoint_matches_numpy(tiny_dir, name, route):
    ref = portable_dg.load(tiny_dir(name))
    ours = portable_dg.load(tiny_dir(name), backend="ggml", n_threads=2, blas_min_tokens=ROUTES[route])
    assert np.abs(canvas_logits(ref) - canvas_logits(ours)).max() <= 1e-4
    assert (greedy(ref) == greedy(ours)).all()


@pytest.fixture(scope="module")
def gguf_file(tiny_dir, tmp_path_factory):
    """Factory: gguf_file(quant) -> tiny checkpoint "a" converted to GGUF (cached)."""
    pytest.importorskip("gguf")
    from portable_dg.converters.gguf import convert_to_gguf

    made = {}

    def make(quant):
        if quant not in made:
            out = tmp_path_factory.mktemp("ggml_gguf") / f"a-{quant}.gguf"
            made[quant] = convert_to_gguf(tiny_dir("a"), out, quant, progress=False)
        return made[quant]
    return make


def test_f32_gguf_matches_numpy(tiny_dir, gguf_file):
    ref = portable_dg.load(tiny_dir("a"))
    ours = portable_dg.load(gguf_file("F32"), backend="ggml", n_threads=2)
    assert np.abs(canvas_logits(ref) - canvas_logits(ours)).max() <= 1e-4
    assert (greedy(ref) == greedy(ours)).all()


def kl_and_top1(ref, other):
    """Mean KL(softmax ref || softmax other) per position, and top-1 agreement."""
    lp = ref - np.logaddexp.reduce(ref, -1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, -1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()), float((ref.argmax(-1) == other.argmax(-1)).mean())


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_quantized_gguf_matches_numpy_on_the_same_file(gguf_file, quant, route):
    """Same blocks, two backends.  ggml's kernels round the activations to 8 bits, which moves
    this flat-logit model (logit std 0.16) by KL 1.9e-3 (Q8_0) and 3.2e-3 (Q4_K_M), as much as
    quantizing the weights did (Q8_0 vs F32: 2.0e-3).  Block layouts are checked op by op above."""
    path = gguf_file(quant)
    ref = canvas_logits(portable_dg.load(path)).astype(np.float64)
    ours = canvas_logits(portable_dg.load(path, backend="ggml", n_threads=2,
                                          blas_min_tokens=ROUTES[route])).astype(np.float64)
    kl, _ = kl_and_top1(ref, ours)
    assert kl < 6e-3, kl


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_input(backend):
    W = backend.weight("model.decoder.layers.0.mlp.up_proj.weight", rand(8, 16))
    with pytest.raises(ConfigError, match="up_proj.*expects 16"):
        backend.linear(rand(4, 12), W)
    with pytest.raises(ConfigError, match=r"ids must lie in \[0, 8\)"):
        backend.embedding(W, np.array([8]))
    E3 = backend.weight("experts", rand(3, 8, 16))
    with pytest.raises(ConfigError, match=r"ids must lie in \[0, 3\)"):
        backend.expert_linear(rand(4, 16), E3, np.full((4, 2), 3))
    with pytest.raises(CheckpointError, match="w4: expected a 2-D or 3-D weight"):
        backend.weight("w4", rand(2, 2, 2, 2))
    with pytest.raises(CheckpointError, match="ints: expected a float tensor"):
        backend.weight("ints", np.zeros((2, 2), np.int32))

    class Truncated:
        shape, ggml_type, data = (4, 64), ggml.GGML_TYPE_Q8_0, np.zeros((4, 60), np.uint8)

    with pytest.raises(CheckpointError, match="truncated: 272 bytes expected"):
        backend.weight("truncated", Truncated)
    Truncated.ggml_type = 4                                   # Q4_2: removed from ggml long ago
    with pytest.raises(CheckpointError, match="truncated: ggml type 4 is not one this ggml build knows"):
        backend.weight("truncated", Truncated)
    Truncated.shape, Truncated.ggml_type = (4, 48), ggml.GGML_TYPE_Q8_0
    with pytest.raises(CheckpointError, match="rows of 48 values do not fill whole blocks of q8_0"):
        backend.weight("truncated", Truncated)


def test_options_and_missing_package(monkeypatch):
    with pytest.raises(ConfigError, match="unknown option"):
        create(dtype="float64")
    with pytest.raises(ConfigError, match="must be positive"):
        create(blas_min_tokens=0)
    with pytest.raises(BackendUnavailable, match="could not start device 'NoSuchGPU0'"):
        create(device="NoSuchGPU0")
    monkeypatch.setitem(sys.modules, "ggml", None)       # import ggml now raises ImportError
    with pytest.raises(BackendUnavailable, match="ggml-python"):
        create()
