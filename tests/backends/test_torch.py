"""The PyTorch backend against the numpy reference on the tiny checkpoints (CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import portable_dg  # noqa: E402
from portable_dg.errors import BackendUnavailable, ConfigError  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def pattern(n: int, vocab_size: int, a: int = 7, b: int = 3) -> np.ndarray:
    return (a * np.arange(n) + b) % vocab_size


def three_passes(model) -> np.ndarray:
    """Logits of a plain canvas step, a self-conditioned one, and one after a commit: [3L, V]."""
    V, L = model.config.vocab_size, model.canvas_length
    ctx = model.start(pattern(20, V, 1, 3))
    canvas = pattern(L, V)
    plain = ctx.denoise(canvas)
    conditioned = ctx.denoise(canvas, plain / 0.7)
    ctx.commit(canvas)
    committed = ctx.denoise(pattern(L, V, 11, 1))
    return np.concatenate([plain, conditioned, committed])


def kl_and_top1(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(reference) || softmax(logits)) in nats, and top-1 agreement."""
    def log_softmax(x):
        z = x.astype(np.float64) - x.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = log_softmax(reference), log_softmax(logits)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((reference.argmax(-1) == logits.argmax(-1)).mean())


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_float32_logits_match_numpy(tiny_dir, name):
    path = tiny_dir(name)
    expected = three_passes(portable_dg.load(path, backend="numpy"))
    got = three_passes(portable_dg.load(path, backend="torch"))
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("name", ["a", "c"])
def test_greedy_sequences_match_numpy(tiny_dir, name):
    path = tiny_dir(name)
    runs = []
    for backend in ("numpy", "torch"):
        model = portable_dg.load(path, backend=backend)
        V = model.config.vocab_size
        runs.append(portable_dg.generate(model, pattern(12, V, 5, 2), greedy=True,
                                         noise=lambda n: (37 * np.arange(n) + 5) % V))
    np.testing.assert_array_equal(runs[1].sequences, runs[0].sequences)
    assert runs[1].steps == runs[0].steps


def test_sampled_generation_matches_numpy(tiny_a):
    """Categorical sampling, entropy, acceptance and renoising run on the device with the same decisions."""
    runs = [portable_dg.generate(portable_dg.load(tiny_a, backend=b), [5, 9, 2, 7], seed=3)
            for b in ("numpy", "torch")]
    np.testing.assert_array_equal(runs[1].sequences, runs[0].sequences)


def test_bfloat16_within_measured_bounds(tiny_a):
    # measured on tiny "a": KL 0.0015 nats, top-1 0.81; bounds leave about 3x / 0.15 of room
    reference = three_passes(portable_dg.load(tiny_a, backend="numpy"))
    model = portable_dg.load(tiny_a, backend="torch", dtype="bfloat16")
    assert model.network.weights["model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    kl, top1 = kl_and_top1(reference, three_passes(model))
    assert kl <= 0.005 and top1 >= 0.65, (kl, top1)


def test_bfloat16_weights_go_to_the_device_as_stored(tiny_dir):
    """A bf16 checkpoint in bf16: each weight holds the stored bits (no float32 round trip)."""
    path = tiny_dir("a", "bfloat16")
    model = portable_dg.load(path, backend="torch", dtype="bfloat16")
    name = "model.decoder.layers.0.mlp.down_proj.weight"
    stored = model.source.tensors.stored(name)
    weight = model.network.weights[name]
    assert weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(weight.view(torch.int16).numpy().view(np.uint16), stored.bits)


def test_float32_weights_are_the_memory_map(tiny_a):
    """On CPU in float32 a weight is the safetensors memory map itself: no second copy."""
    source = portable_dg.source.open_source(tiny_a)
    name = "model.decoder.layers.0.mlp.down_proj.weight"
    array = source.tensors[name]
    assert isinstance(array, np.memmap)
    tensor = portable_dg.backends.get_backend("torch").weight(name, array)
    assert tensor.data_ptr() == array.ctypes.data


def test_expert_loop_fallback_equals_grouped_kernel(monkeypatch):
    from portable_dg.backends.torch import experts

    backend = portable_dg.backends.get_backend("torch")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, 12, generator=gen)
    x = torch.randn(9, 12, generator=gen)
    ids = torch.randint(0, 6, (9, 2), generator=gen)
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % 6, ids[:, 1])
    grouped = backend.expert_linear(x, w, ids)
    monkeypatch.setattr(experts, "grouped_kernel_usable", lambda a, b: False)
    looped = backend.expert_linear(x, w, ids)
    direct = torch.einsum("tkoi,ti->tko", w[ids], x)
    torch.testing.assert_close(grouped, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(looped, direct, rtol=1e-5, atol=1e-5)


def test_windowed_causal_attention_mask():
    backend = portable_dg.backends.get_backend("torch")
    numpy_backend = portable_dg.backends.get_backend("numpy")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
    for shift, window in ((4, None), (4, 3), (0, 2)):
        expected = numpy_backend.attention(q, k, v, causal_shift=shift, window=window)
        got = backend.attention(*(torch.from_numpy(a) for a in (q, k, v)), causal_shift=shift, window=window)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="'cuda' requested.*--device cpu"):
        portable_dg.backends.get_backend("torch", device="cuda")


@pytest.mark.parametrize("options, message", [
    ({"dtype": "float16"}, "dtype must be one of float32, bfloat16"),
    ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"threads": 4}, "unknown option"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        portable_dg.backends.get_backend("torch", **options)


def test_graph_keys_never_meet_a_freed_frame(tiny_model):
    """Captured steps are keyed by frame serials: a new frame never replays an old graph, even when
    Python gives it the memory (the id()) of a freed one, which an id()-based key would reuse."""
    from portable_dg.backends.torch.graphs import step_key
    from portable_dg.sampler import StepKnobs, StepState

    model = tiny_model("a")
    network, L = model.network, model.canvas_length
    cache = network.make_cache(1, 64)
    network.encode(np.arange(1, 9)[None], cache, [0])
    state = StepState(np.zeros((1, L), np.int64), None, np.zeros((1, 1, L), np.int64))
    knobs = StepKnobs(*[None] * len(StepKnobs.__dataclass_fields__))
    knobs.condition, knobs.all_greedy = True, False
    seen: dict[int, tuple] = {}
    for _ in range(200):
        frame = network.frame(cache, [0], L, decoder=True)
        key = step_key(frame, state, knobs)
        if id(frame) in seen:
            assert seen[id(frame)] != key
            return
        seen[id(frame)] = key
        del frame
    pytest.fail("Python never reused a frame's id: the test could not exercise the reuse")


# torch.compile of the whole denoising step takes about two minutes on two CPU cores: run with PDG_SLOW=1.
@pytest.mark.skipif(not os.environ.get("PDG_SLOW"), reason="slow (torch.compile on CPU): set PDG_SLOW=1")
def test_compiled_step_equals_eager(tiny_a):
    """The step hook: the same generation through torch.compile and op by op."""
    runs = []
    for compile in (False, True):
        model = portable_dg.load(tiny_a, backend="torch", compile=compile)
        runs.append(portable_dg.generate(model, pattern(10, 512, 5, 2), greedy=True, max_new_tokens=32,
                                         noise=lambda n: (37 * np.arange(n) + 5) % 512))
    np.testing.assert_array_equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].steps == runs[1].steps
