"""The vision-path parity oracle (`reference.hf_image_logits`) is transformers' `generate`: on tiny
multimodal checkpoints its plain, self-conditioned and after-commit logits equal, bit for bit, the
logits of the matching decoder calls of a deterministic `generate` on the same image prompt."""

from __future__ import annotations

import numpy as np
import pytest

from reference import deterministic, hf_image_logits, load_hf, load_hf_processor, pattern, single_threaded
from test_image_processor import synthetic
from tiny import build_tiny_multimodal

torch = pytest.importorskip("torch")


@single_threaded
def recorded_generate(model, inputs, **options):
    """transformers' generate on an image prompt under `reference.deterministic`: (sequence, calls)."""
    arrays = {k: torch.from_numpy(np.asarray(inputs[k]))
              for k in ("pixel_values", "image_position_ids", "mm_token_type_ids")}
    with deterministic(model) as calls, torch.no_grad():
        out = model.generate(torch.from_numpy(inputs["input_ids"]), **arrays, **options)
    return out.sequences[0].numpy(), calls


@pytest.mark.parametrize("name, geometry", [("a", "p4k2"), ("c", "p2k3")])
def test_oracle_is_generate(tmp_path, name, geometry):
    model_path = tmp_path / "model"
    build_tiny_multimodal(model_path, name, geometry)
    model, processor = load_hf(model_path), load_hf_processor(model_path)
    images = [synthetic(37, 61, seed=1), synthetic(90, 30, seed=2)]
    inputs = processor(text="Compare <|image|> and <|image|>.", images=images, return_tensors="np")
    L, V = model.config.canvas_length, model.config.text_config.vocab_size
    P = inputs["input_ids"].shape[1]
    sequence, calls = recorded_generate(model, inputs, max_new_tokens=2 * L, max_denoising_steps=3)
    block = sequence[P:P + L]
    second_canvas = next(c for c in calls if c.position == P + L)
    assert calls[0].canvas.tolist() == pattern(L, V).tolist() and calls[1].position == P

    first = hf_image_logits(model, inputs, pattern(L, V), block, temperature=1.0)
    np.testing.assert_array_equal(first.plain, calls[0].logits)
    np.testing.assert_array_equal(first.after_commit, second_canvas.logits)
    conditioned = hf_image_logits(model, inputs, calls[1].canvas, block, temperature=1.0,
                                  self_conditioning=calls[1].self_conditioning)
    np.testing.assert_array_equal(conditioned.self_conditioned, calls[1].logits)

    # The pixels reach the logits, and so does the bidirectional attention inside each image.
    blank = dict(inputs, pixel_values=np.zeros_like(inputs["pixel_values"]))
    assert np.abs(hf_image_logits(model, blank, pattern(L, V), block, 1.0).plain - first.plain).max() > 1e-2
    causal = dict(inputs, mm_token_type_ids=np.zeros_like(inputs["mm_token_type_ids"]))
    assert np.abs(hf_image_logits(model, causal, pattern(L, V), block, 1.0).plain - first.plain).max() > 1e-2
