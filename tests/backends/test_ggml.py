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


# --- the step as whole ggml graphs --------------------------------------------------------------

def synthetic_model(backend, qtype, layer_types=("sliding_attention", "full_attention"), canvas=16, seed=0):
    """A random-weight model whose products all hold `qtype` blocks (widths of 256, so K-quants
    fit), vectors float32; on `backend` ("numpy" dequantizes them)."""
    from portable_dg.checkpoint import expected_tensors
    from portable_dg.config import DiffusionGemmaConfig, GenerationConfig
    from portable_dg.converters.gguf import GGUFTensor
    from portable_dg.runtime import Model
    from portable_dg.source import ModelSource

    config = DiffusionGemmaConfig.from_dict(dict(
        model_type="diffusion_gemma_text", vocab_size=512, hidden_size=256, intermediate_size=256,
        moe_intermediate_size=256, num_experts=4, top_k_experts=2, num_hidden_layers=len(layer_types),
        layer_types=list(layer_types), num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        global_head_dim=256, num_global_key_value_heads=1, sliding_window=8, canvas_length=canvas,
        eos_token_id=[1], pad_token_id=0, bos_token_id=2))
    rng = np.random.default_rng(seed)
    t = getattr(ggml, f"GGML_TYPE_{qtype}")
    tensors = {}
    for name, shape in expected_tensors(config).items():
        if len(shape) == 1:
            tensors[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            continue
        w = rng.standard_normal(shape).astype(np.float32) * (0.03 if "embed" in name else shape[-1] ** -0.5)
        tensors[name] = GGUFTensor(name, shape, qtype, t, quantize(w, t).reshape(*shape[:-1], -1))
    source = ModelSource(config, GenerationConfig(max_new_tokens=2 * canvas, max_denoising_steps=4, eos_token_id=[1],
                                                  pad_token_id=0), tensors, None, "gguf", "synthetic")
    from portable_dg.backends import get_backend

    return Model(source, backend if not isinstance(backend, str) else get_backend(backend))


def two_passes(network, frame, state, knobs):
    """A first and a self-conditioned second decoder pass (what `denoise_step` runs, minus sampling)."""
    first = network.denoise(state.canvas, frame, state.soft)
    second = network.denoise(state.canvas, frame, network.condition(first / 0.8))
    return first, second


def pass_logits(model, seed=0):
    """two_passes through the backend's step hook after a 12-token prompt -> logits [2, L, V]."""
    from portable_dg.backend import compile_step
    from portable_dg.sampler import StepState

    rng = np.random.default_rng(seed)
    V, L = model.config.vocab_size, model.canvas_length
    ctx = model.start(rng.integers(0, V, 12))
    frame = model.network.frame(ctx.cache, [0], L, decoder=True)
    state = StepState(rng.integers(0, V, (1, L)), None, np.zeros((1, 0, L), np.int64))
    first, second = compile_step(model.backend, two_passes)(model.network, frame, state, None)
    return np.concatenate([first, second]).astype(np.float64)


GRAPH_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", GRAPH_TYPES)
def test_graph_passes_match_numpy_on_every_type(qtype):
    """The decoder passes as ggml graphs (every product in ggml) against the numpy reference on the
    same blocks.  Float weights agree to float32 rounding; quantized ones differ by ggml's 8-bit
    rounding of the activations, as the per-op path's ggml products do (KL 4e-3 for Q8_0 to 3e-2
    for Q3_K on this model, logit std 0.5): no more than theirs."""
    ref = pass_logits(synthetic_model("numpy", qtype))
    graphs = pass_logits(synthetic_model(create(n_threads=2, device="cpu", blas_min_tokens=10 ** 9), qtype))
    per_op = pass_logits(synthetic_model(create(n_threads=2, device="cpu", blas_min_tokens=10 ** 9, graphs=False),
                                         qtype))
    if qtype == "F32":
        np.testing.assert_allclose(graphs, ref, atol=1e-4 * np.abs(ref).max())     # float32 rounding
    kl, top1 = kl_and_top1(ref, graphs)
    kl_per_op, _ = kl_and_top1(ref, per_op)
    assert kl <= 1.25 * kl_per_op + 1e-6 and top1 >= 0.875, (kl, kl_per_op, top1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_graph_with_blas_products_matches_per_op(qtype):
    """With BLAS products between graph segments (blas_min_tokens=1) the graphs give the per-op
    path's logits: to float32 rounding when every product takes BLAS (Q8_0 here), and to the
    noise of ggml's 8-bit activation rounding where repacked Q4_K kernels run in ggml between
    them (the graphs' float32 attention rounds differently from numpy's)."""
    graphs = pass_logits(synthetic_model(create(n_threads=2, device="cpu", blas_min_tokens=1), qtype))
    per_op = pass_logits(synthetic_model(create(n_threads=2, device="cpu", blas_min_tokens=1, graphs=False),
                                         qtype))
    if qtype == "Q8_0":
        np.testing.assert_allclose(graphs, per_op, atol=1e-3, rtol=1e-3)
    kl, top1 = kl_and_top1(per_op, graphs)
    assert kl < 1e-4 and top1 == 1.0, (kl, top1)


def step_graph(model):
    """The engine's compiled step (a GraphStep) after generating greedily with fixed noise."""
    from portable_dg.engine import Engine

    V = model.config.vocab_size
    engine = Engine(model, max_batch=2)
    seqs = [engine.submit(np.arange(3, 15) % V, greedy=True, noise=lambda n: (37 * np.arange(n) + 5) % V,
                          max_new_tokens=3 * model.canvas_length) for _ in range(2)]
    engine.run()
    return engine.step_fn, seqs


def test_step_graph_is_built_once_per_shape_and_reused():
    """One trace per canvas shape (the full-attention layer's context grows every canvas), every
    other step of the canvas replayed; a later generation with the same shapes replays them all."""
    model = synthetic_model(create(n_threads=2, device="cpu"), "Q4_0")
    first, seqs = step_graph(model)
    steps = sum(sum(s.output.steps) for s in seqs) // 2          # the two sequences step together
    assert first.recordings == 3 and first.replays == steps - 3 and steps >= 9
    again, repeated = step_graph(model)
    assert again.recordings == 0 and again.replays == steps
    assert [s.output.sequences.tolist() for s in repeated] == [s.output.sequences.tolist() for s in seqs]


def test_step_graph_generates_what_numpy_does():
    """Float32 weights: replayed graphs, the per-op path and the numpy reference make the same
    greedy decisions canvas after canvas."""
    outputs = [[s.output.sequences.tolist() for s in step_graph(synthetic_model(backend, "F32"))[1]]
               for backend in (create(n_threads=2, device="cpu"), create(n_threads=2, device="cpu", graphs=False),
                               "numpy")]
    assert outputs[0] == outputs[1] == outputs[2]


def test_product_bench_replays_every_route():
    """`python -m portable_dg.backends.ggml.bench`'s table on small shapes: every route of every
    shape runs several times (its replayed soft-embedding graph crashed before it was planned)."""
    from portable_dg.backends.ggml.bench import products

    shapes = [("dense", None, 96, 64), ("experts", (4, 2), 32, 64), ("soft", "soft", 96, 64)]
    rows = products(threads=1, T=32, repeat=3, shapes=shapes, types=["F32", "Q8_0", "Q4_0"])
    routes = {(r["shape"], r["type"], r["route"]) for r in rows}
    assert {("soft", "Q4_0", "ggml"), ("soft", "Q4_0", "tiles+BLAS"), ("dense", "Q8_0", "tiles+BLAS"),
            ("experts", "Q4_0", "ggml")} <= routes
    assert all(r["gflops"] > 0 for r in rows)


def test_a_trace_is_not_replayed_before_it_is_planned():
    from portable_dg.backends.ggml.graph_ops import GraphOps
    from portable_dg.backends.ggml.trace import Trace

    backend = create(n_threads=1, device="cpu")
    ops = GraphOps(backend)
    ops.trace = Trace(backend.engine, ops)
    ops.trace.start(0)
    np.asarray(ops.softmax(ops.trace.input(rand(4, 8))))
    with pytest.raises(RuntimeError, match="before plan"):
        ops.trace.start(0)
    ops.trace.plan()
    ops.trace.start(0)
    assert np.allclose(np.asarray(ops.softmax(ops.trace.input(rand(4, 8)))).sum(-1), 1, atol=1e-6)
