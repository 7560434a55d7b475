"""The engine: batches equal single sequences, seeds, the preallocated KV cache, prefix reuse, cancel."""

from __future__ import annotations

import numpy as np
import pytest

import portable_dg
from portable_dg import sudoku as sd
from portable_dg.backends import available
from portable_dg.engine import Engine
from portable_dg.errors import ConfigError
from reference import pattern_noise
from tiny import TINY_CONFIGS, tiny_prompt

BACKENDS = [pytest.param("numpy", {}), pytest.param("torch", {}),
            pytest.param("mlx", {"dtype": "float32"}, marks=pytest.mark.skipif(not available("mlx"),
                                                                                reason="mlx not installed"))]


def vocab(name: str) -> int:
    return TINY_CONFIGS[name]["text"]["vocab_size"]


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_batch_equals_single_sequences(tiny_dir, backend, options, torch_one_thread):
    """Three prompts of different lengths in one batch (pins in one; in another the model emits its
    EOS in the second canvas and leaves the batch early) give exactly what three `generate` calls
    give, under the deterministic stand-ins (fixed noise, argmax sampling)."""
    model = portable_dg.load(tiny_dir("b"), backend=backend, **options)
    V, L = vocab("b"), model.canvas_length
    prompts = [tiny_prompt(19, V), tiny_prompt(7, V), tiny_prompt(12, V)]
    pins = [None, {0: 77, 3: 5, 9: 99}, None]
    common = dict(noise=pattern_noise(V), greedy=True, max_new_tokens=4 * L)
    batch = portable_dg.generate_batch(model, prompts, pinned=pins, **common)
    singles = [portable_dg.generate(model, p, pinned=q, **common) for p, q in zip(prompts, pins)]
    for b, (got, want) in enumerate(zip(batch, singles)):
        np.testing.assert_array_equal(got.sequences, want.sequences, err_msg=f"sequence {b}")
        assert got.steps == want.steps and got.finished == want.finished
    assert batch[0].finished and len(batch[0].steps) == 2             # the EOS case ended early
    assert len(batch[2].steps) == 4
    assert {p: int(batch[1].sequences[0, 7 + p]) for p in pins[1]} == pins[1]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sudoku_batch_equals_one_at_a_time(backend, torch_one_thread):
    """16 puzzles in one batch: the same answers and step counts as one at a time (seeded sampling)."""
    model = portable_dg.load(sd.default_model_path(), backend=backend)
    prompts = [sd.prompt_ids(puzzle) for puzzle, _ in sd.test_set(16)]
    seeds = list(range(100, 116))
    batch = portable_dg.generate_batch(model, prompts, seed=seeds, max_new_tokens=sd.CELLS)
    for prompt, seed, got in zip(prompts, seeds, batch):
        want = portable_dg.generate(model, prompt, seed=seed, max_new_tokens=sd.CELLS)
        np.testing.assert_array_equal(got.sequences, want.sequences)
        assert got.steps == want.steps
    assert len({sum(o.steps) for o in batch}) > 1                   # rows really stopped at different steps


def test_seeds_reproduce_and_differ(tiny_model):
    model = tiny_model("a")
    prompt = tiny_prompt(10, vocab("a"))
    first = portable_dg.generate(model, prompt, seed=7)
    again = portable_dg.generate(model, prompt, seed=7)
    other = portable_dg.generate(model, prompt, seed=8)
    huge = portable_dg.generate(model, prompt, seed=-(2**70))        # any Python int is a seed
    np.testing.assert_array_equal(first.sequences, again.sequences)
    assert not np.array_equal(first.sequences, other.sequences)
    assert huge.sequences.shape == first.sequences.shape


def test_random_numbers_do_not_depend_on_the_batch(tiny_model):
    """A seeded sampled sequence is the same alone and next to others with other seeds."""
    model = tiny_model("a")
    prompts = [tiny_prompt(n, vocab("a")) for n in (5, 9, 13)]
    batch = portable_dg.generate_batch(model, prompts, seed=[1, 2, 3])
    for prompt, seed, got in zip(prompts, (1, 2, 3), batch):
        np.testing.assert_array_equal(got.sequences, portable_dg.generate(model, prompt, seed=seed).sequences)


def test_per_sequence_knobs(tiny_model):
    """Knobs given per prompt apply to their own sequence only."""
    model = tiny_model("a")
    prompts = [tiny_prompt(6, vocab("a")), tiny_prompt(8, vocab("a"))]
    out = portable_dg.generate_batch(model, prompts, seed=0, max_denoising_steps=[3, 5],
                                     max_new_tokens=[16, 32])
    assert out[0].steps == [3] and out[1].steps == [5, 5]
    with pytest.raises(ConfigError, match="3 values for 2 prompts"):
        portable_dg.generate_batch(model, prompts, seed=[1, 2, 3])
    with pytest.raises(ConfigError, match="unknown option"):
        portable_dg.generate_batch(model, prompts, temperature=1.0)


def test_encoder_writes_the_cache_in_place(tiny_model):
    """Commits write into the preallocated buffers: no new allocation across canvases."""
    model = tiny_model("a")
    L = model.canvas_length
    ctx = model.start(tiny_prompt(10, vocab("a")))
    buffers = [id(k) for k in ctx.cache.keys] + [id(v) for v in ctx.cache.values]
    capacity, generation = ctx.cache.capacity, ctx.cache.generation
    for block in range(4):
        ctx.commit((3 * np.arange(L) + block) % vocab("a"))
    assert ctx.length == 10 + 4 * L <= capacity
    assert [id(k) for k in ctx.cache.keys] + [id(v) for v in ctx.cache.values] == buffers
    assert ctx.cache.generation == generation


def test_sliding_ring_past_several_windows(tiny_model):
    """Canvas by canvas commits wrap the sliding rings several times; the decoder sees the same
    context as after encoding the whole sequence in one pass (which never wraps mid-write)."""
    model = tiny_model("a")
    V, L = vocab("a"), model.canvas_length
    window = TINY_CONFIGS["a"]["text"]["sliding_window"]
    prompt = tiny_prompt(11, V)
    blocks = [(5 * np.arange(L) + 3 * b) % V for b in range(5)]
    stepwise = model.start(prompt)
    for block in blocks:
        stepwise.commit(block)
    whole = model.start(np.concatenate([prompt, *blocks]))
    assert stepwise.length == whole.length > 3 * (window - 1 + L)         # the rings wrapped 3 times
    canvas = (7 * np.arange(L) + 1) % V
    np.testing.assert_allclose(stepwise.denoise(canvas), whole.denoise(canvas), atol=2e-5)


def test_prefix_reuse_gives_the_fresh_result(tiny_model):
    """A prompt that extends a finished sequence's prompt and committed canvases reuses its cache row
    (encoding only the rest) and gives what a fresh cache gives."""
    model = tiny_model("a")
    V, L = vocab("a"), model.canvas_length
    settings = dict(noise=pattern_noise(V), greedy=True)
    engine = Engine(model, max_batch=1, prefix_rows=1)
    first = engine.submit(tiny_prompt(10, V), max_new_tokens=3 * L, **settings)
    engine.run()
    follow_up = np.concatenate([first.encoded, [7, 8, 9]])
    assert len(first.encoded) == 10 + 2 * L                          # the last canvas is never encoded
    reused_row = engine.parked[0].row
    second = engine.submit(follow_up, max_new_tokens=L, **settings)
    engine.step()
    assert second.row == reused_row and engine.cache.lengths[reused_row] == len(follow_up)
    engine.run()
    fresh = portable_dg.generate(model, follow_up, max_new_tokens=L, **settings)
    np.testing.assert_array_equal(second.output.sequences, fresh.sequences)
    reference = model.start(follow_up).cache
    for i in range(model.config.num_hidden_layers):
        n = reference.visible(i, len(follow_up))
        ours = engine.cache.read(i, reused_row, len(follow_up) - n, len(follow_up))
        theirs = reference.read(i, 0, len(follow_up) - n, len(follow_up))
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_cut_back_prefix_reuse(tiny_model):
    """A prompt that agrees with a parked row only up to the middle of its last committed canvas still
    reuses it (the rings keep one canvas of slack)."""
    model = tiny_model("a")
    V, L = vocab("a"), model.canvas_length
    settings = dict(noise=pattern_noise(V), greedy=True)
    engine = Engine(model, max_batch=1, prefix_rows=1)
    first = engine.submit(tiny_prompt(10, V), max_new_tokens=2 * L, **settings)
    engine.run()
    prompt = np.concatenate([first.encoded[:10 + L // 2], [1, 2, 3]])
    second = engine.submit(prompt, max_new_tokens=L, **settings)
    engine.run()
    fresh = portable_dg.generate(model, prompt, max_new_tokens=L, **settings)
    np.testing.assert_array_equal(second.output.sequences, fresh.sequences)


def test_cancel_frees_the_slot(tiny_model):
    model = tiny_model("a")
    V = vocab("a")
    engine = Engine(model, max_batch=1)
    doomed = engine.submit(tiny_prompt(8, V), seed=0)
    waiting = engine.submit(tiny_prompt(9, V), seed=1)
    engine.step()
    assert engine.running == [doomed]
    engine.cancel(doomed)
    assert doomed.done and doomed.output is None and engine.active == 1
    engine.run()
    np.testing.assert_array_equal(waiting.output.sequences,
                                  portable_dg.generate(model, tiny_prompt(9, V), seed=1).sequences)


def test_engine_options_are_checked(tiny_model):
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(tiny_model("a"), max_batch=0)
    engine = Engine(tiny_model("a"))
    with pytest.raises(ConfigError, match="seed must be an integer"):
        engine.submit([2, 3], seed="x")
    with pytest.raises(ConfigError, match="empty"):
        engine.submit([])


def test_a_failing_callback_fails_only_its_sequence(tiny_model):
    """An exception in one sequence's own on_step (or noise function) ends that sequence with the
    error; the others finish with the results they get alone."""
    model = tiny_model("a")
    V = vocab("a")

    def boom(info):
        raise RuntimeError("callback failed")

    engine = Engine(model, max_batch=3)
    bad = engine.submit(tiny_prompt(8, V), seed=0, on_step=boom)
    broken_noise = engine.submit(tiny_prompt(8, V), seed=0, noise=lambda n: np.zeros(n + 1, np.int64))
    good = engine.submit(tiny_prompt(9, V), seed=1)
    engine.run()
    assert isinstance(bad.error, RuntimeError) and bad.output is None and bad.done
    assert isinstance(broken_noise.error, ConfigError) and "noise(16) must return 16" in str(broken_noise.error)
    np.testing.assert_array_equal(good.output.sequences,
                                  portable_dg.generate(model, tiny_prompt(9, V), seed=1).sequences)
    with pytest.raises(RuntimeError, match="callback failed"):
        portable_dg.generate(model, tiny_prompt(8, V), on_step=boom)
