"""The sampler's own features (transformers has no equivalent): pinned positions, seeds, the
per-step callback, the temperature schedule, and invalid options."""

from __future__ import annotations

import numpy as np
import pytest

import portable_dg
from portable_dg.config import GenerationConfig
from portable_dg.errors import ConfigError
from portable_dg.sampler import StepInfo, temperature
from tiny import tiny_prompt

V, L = 512, 16          # tiny checkpoint "a"
PROMPT = tiny_prompt(10, V)


def generate(model, **options):
    steps: list[StepInfo] = []
    out = portable_dg.generate(model, PROMPT, on_step=steps.append, **options)
    return out, steps


@pytest.mark.parametrize("greedy", [False, True])
def test_pinned_positions_never_change(tiny_model, greedy):
    """Pins in both canvases hold in every draft and in the output, sampled or greedy."""
    pins = {0: 77, 3: 5, 17: 99, 31: 300}
    out, steps = generate(tiny_model("a"), pinned=pins, seed=3, greedy=greedy, max_new_tokens=2 * L)
    assert [s.block for s in steps] == [0] * out.steps[0] + [1] * out.steps[1]
    for s in steps:
        for position, token in pins.items():
            if position // L == s.block:
                assert s.draft[position % L] == token, f"step {s.step} of canvas {s.block} moved pin {position}"
    generated = out.sequences[0, len(PROMPT):]
    assert {p: int(generated[p]) for p in pins} == pins


def test_pins_taken_from_the_starting_canvas(tiny_model):
    start = (3 * np.arange(L) + 1) % V
    out, steps = generate(tiny_model("a"), start_canvas=start, pinned=[2, 9], seed=0, max_new_tokens=L)
    assert all(s.draft[2] == start[2] and s.draft[9] == start[9] for s in steps)
    generated = out.sequences[0, len(PROMPT):]
    assert (generated[2], generated[9]) == (start[2], start[9])


def test_unpinned_generation_differs_at_the_pinned_positions(tiny_model):
    """The pins are not what the model would have chosen anyway (so the test above means something)."""
    pins = {0: 77, 3: 5, 17: 99, 31: 300}
    free, _ = generate(tiny_model("a"), seed=3, greedy=True, max_new_tokens=2 * L)
    generated = free.sequences[0, len(PROMPT):]
    assert all(generated[p] != t for p, t in pins.items())


def test_same_seed_same_output_different_seeds_differ(tiny_model):
    model = tiny_model("a")
    first, steps_first = generate(model, seed=7)
    again, steps_again = generate(model, seed=7)
    other, _ = generate(model, seed=8)
    np.testing.assert_array_equal(first.sequences, again.sequences)
    assert [s.draft.tolist() for s in steps_first] == [s.draft.tolist() for s in steps_again]
    assert not np.array_equal(first.sequences, other.sequences)


def test_on_step_reports_each_step(tiny_model):
    out, steps = generate(tiny_model("a"), seed=1, max_new_tokens=2 * L)
    assert len(steps) == sum(out.steps) == 16                  # the chaotic tiny model never stops early
    first = steps[0]
    assert (first.block, first.step, first.steps_left, first.stopped) == (0, 1, 8, False)
    assert first.temperature == pytest.approx(0.8)
    assert [s.steps_left for s in steps[:8]] == list(range(8, 0, -1))
    assert all(1 <= s.accepted <= L and s.draft.shape == (L,) for s in steps)
    np.testing.assert_array_equal(steps[7].draft, out.sequences[0, len(PROMPT):len(PROMPT) + L])


def test_stop_is_reported_to_on_step(tiny_model):
    out, steps = generate(tiny_model("a"), stability_threshold=0, t_min=1e-5, t_max=2e-5, max_new_tokens=2 * L)
    assert out.steps == [1, 1] and [s.stopped for s in steps] == [True, True]
    assert all(s.mean_entropy < 0.005 for s in steps)


@pytest.mark.parametrize("t_min,t_max,steps", [(0.4, 0.8, 48), (1e-5, 2e-5, 8), (0.0, 1.0, 7)])
def test_temperature_schedule_is_transformers(t_min, t_max, steps):
    """Bit-identical to LinearTemperatureScheduleLogitsProcessor (float32, n counting down)."""
    import torch

    cfg = GenerationConfig(t_min=t_min, t_max=t_max, max_denoising_steps=steps)
    for n in range(steps, 0, -1):
        # transformers: t_min + (t_max - t_min) * (cur_step / N), cur_step an int32 tensor
        theirs = t_min + (t_max - t_min) * (torch.tensor(n, dtype=torch.int32) / steps)
        assert temperature(cfg, n) == float(theirs)
        assert np.float32(temperature(cfg, n)) == theirs.numpy()


@pytest.mark.parametrize("options,words", [
    (dict(t_min=0.8, t_max=0.4), "t_max > t_min"),
    (dict(t_min=-1.0), "t_min"),
    (dict(max_denoising_steps=-2), "max_denoising_steps"),
    (dict(max_denoising_steps=2.5), "max_denoising_steps"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stability_threshold=-1), "stability_threshold"),
    (dict(confidence_threshold=-0.1), "confidence_threshold"),
    (dict(entropy_bound=-0.1), "entropy_bound"),
    (dict(start_canvas=list(range(L - 1))), "start_canvas has 15 ids"),
    (dict(start_canvas=[V] * L), "start_canvas"),
    (dict(pinned={2 * L: 5}), "pinned position 32"),
    (dict(pinned={1: V}), "pinned token 512"),
    (dict(pinned=[1, 2]), "start_canvas"),
])
def test_invalid_options(tiny_model, options, words):
    with pytest.raises(ConfigError) as e:
        portable_dg.generate(tiny_model("a"), PROMPT, **{"max_new_tokens": 2 * L, **options})
    assert words in str(e.value)
