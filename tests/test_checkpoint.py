"""Reading Hugging Face checkpoints: sanitize, shards, bf16, and every way a weight file can be bad.

Each bad-input test damages a copy of tiny checkpoint "a" and expects one PortableDGError naming
the file or tensor, with the directory left exactly as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import portable_dg
from portable_dg.checkpoint import bf16_to_f32, expected_tensors, open_checkpoint, sanitize
from portable_dg.config import DiffusionGemmaConfig
from portable_dg.errors import CheckpointError
from tiny import tiny_prompt

WEIGHTS = "model.safetensors"
Q_PROJ = "model.decoder.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def checkpoint(tiny_dir, tmp_path) -> Path:
    """A private copy of tiny checkpoint "a" to damage."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("a"), target)
    return target


def snapshot(directory: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def rewrite(path: Path, edit) -> None:
    """Rewrite the weights file with edit(tensors: dict) applied."""
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def expect_error(path: Path, *words: str) -> None:
    before = snapshot(path)
    with pytest.raises(CheckpointError) as e:
        portable_dg.load(path)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert snapshot(path) == before, "a failed load changed the checkpoint directory"


def test_sanitize_keeps_exactly_the_text_tensors(tiny_a):
    cfg = DiffusionGemmaConfig.from_file(tiny_a / "config.json")
    stored = open_checkpoint(tiny_a)
    assert len(stored) == 112                                  # spec §7.1, vision tower included
    assert set(sanitize(stored)) == set(expected_tensors(cfg))
    encoder_scalars = [n for n in sanitize(stored) if n.startswith("model.encoder.")]
    assert sorted(encoder_scalars) == [f"model.encoder.language_model.layers.{i}.layer_scalar" for i in range(4)]


def test_sanitize_drops_tied_copies_and_renames_mlx_experts(tiny_a):
    ref = open_checkpoint(tiny_a)[Q_PROJ]
    stored = {"lm_head.weight": ref, "model.encoder.language_model.layers.0.self_attn.q_proj.weight": ref,
              "model.encoder.vision_tower.encoder.layers.0.mlp.linear.weight": ref,
              "model.decoder.layers.0.experts.gate_up_proj.weight": ref, Q_PROJ: ref}
    assert sorted(sanitize(stored)) == ["model.decoder.layers.0.experts.gate_up_proj", Q_PROJ]


def test_bf16_widening_is_exact():
    import torch

    values = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_to_f32(bits), values.float().numpy())


def test_bf16_checkpoint_loads_widened(tiny_dir):
    path = tiny_dir("a", "bfloat16")
    from safetensors.torch import load_file as load_torch

    model = portable_dg.load(path)
    assert model.source.metadata["dtypes"] == ["BF16"]
    stored = load_torch(str(path / WEIGHTS))[Q_PROJ]
    np.testing.assert_array_equal(model.network.weights[Q_PROJ], stored.float().numpy())


def test_sharded_checkpoint_equals_single_file(tiny_dir, hf_model, tmp_path, tiny_model):
    """save_pretrained with small shards writes an index; loading it gives identical logits."""
    sharded = tmp_path / "sharded"
    hf_model("a").save_pretrained(str(sharded), max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    prompt, canvas = tiny_prompt(5, 512), np.arange(16) * 3
    logits = [m.start(prompt).denoise(canvas) for m in (portable_dg.load(sharded), tiny_model("a"))]
    np.testing.assert_array_equal(*logits)


def test_missing_weights_file(checkpoint):
    (checkpoint / WEIGHTS).unlink()
    expect_error(checkpoint, str(checkpoint), "no *.safetensors")


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("cut", [
    lambda data: data[:4],                                   # inside the length prefix
    lambda data: data[:8 + header_length(data) // 2],        # inside the JSON header
    lambda data: data[:-10],                                 # inside the last tensor
], ids=["prefix", "header", "tensor"])
def test_truncated_weights_file(checkpoint, cut):
    path = checkpoint / WEIGHTS
    path.write_bytes(cut(path.read_bytes()))
    expect_error(checkpoint, str(path), "truncated")


def test_missing_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.pop(Q_PROJ))
    expect_error(checkpoint, "missing tensor", Q_PROJ, "[128, 64]")


def test_missing_encoder_layer_scalar(checkpoint):
    name = "model.encoder.language_model.layers.2.layer_scalar"
    rewrite(checkpoint, lambda t: t.pop(name))
    expect_error(checkpoint, "missing tensor", name)


def test_wrong_shape(checkpoint):
    rewrite(checkpoint, lambda t: t.update({Q_PROJ: np.zeros((64, 64), np.float32)}))
    expect_error(checkpoint, Q_PROJ, "[64, 64]", "expected [128, 64]")


def test_wrong_dtype(checkpoint):
    rewrite(checkpoint, lambda t: t.update({Q_PROJ: np.zeros((128, 64), np.int32)}))
    expect_error(checkpoint, Q_PROJ, "I32")


def test_index_names_a_missing_shard(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {Q_PROJ: WEIGHTS, "model.decoder.norm.weight": "model-00002-of-00002.safetensors"}}))
    expect_error(checkpoint, "model.safetensors.index.json", "model-00002-of-00002.safetensors")


def test_index_names_a_tensor_missing_from_its_shard(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {Q_PROJ: WEIGHTS, "model.decoder.extra.weight": WEIGHTS}}))
    expect_error(checkpoint, "model.decoder.extra.weight", WEIGHTS)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        portable_dg.load(tmp_path / "nowhere")


def edit_header(path: Path, edit) -> None:
    """Rewrite the safetensors header with edit(header: dict) applied, keeping the data bytes."""
    data = path.read_bytes()
    n = header_length(data)
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])


def offsets(header: dict, name: str) -> list[int]:
    return header[name]["data_offsets"]


@pytest.mark.parametrize("edit, words", [
    # a tensor whose bytes are Q_PROJ's first 64: the safetensors library refuses overlaps
    (lambda h: h.update({"extra": {"dtype": "F32", "shape": [16],
                                   "data_offsets": [offsets(h, Q_PROJ)[0], offsets(h, Q_PROJ)[0] + 64]}}),
     ["overlaps"]),
    # 2^32 x 2^32 float32 values in zero bytes: 2^64 * 4 wraps to 0 in int64 arithmetic
    (lambda h: h.update({"huge": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 0]}}),
     ["huge", "[4294967296, 4294967296]", "expected 73786976294838206464"]),
    (lambda h: h[Q_PROJ].update(shape=[-128, -64]), [Q_PROJ, "non-negative integers"]),
    (lambda h: h[Q_PROJ].update(shape=[128.0, 64]), [Q_PROJ, "non-negative integers"]),
    (lambda h: h[Q_PROJ].update(data_offsets=[10, 2]), [Q_PROJ, "data_offsets [10, 2]"]),
    (lambda h: h[Q_PROJ].update(dtype=7), [Q_PROJ, "unsupported dtype 7"]),
    (lambda h: h.update({Q_PROJ: "nothing"}), [Q_PROJ, "corrupt header entry"]),
], ids=["overlap", "absurd-shape", "negative", "float-dims", "reversed-offsets", "dtype-type", "entry-type"])
def test_corrupt_header_entries(checkpoint, edit, words):
    edit_header(checkpoint / WEIGHTS, edit)
    expect_error(checkpoint, str(checkpoint / WEIGHTS), *words)


def test_unused_bytes_are_refused(checkpoint):
    path = checkpoint / WEIGHTS
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    expect_error(checkpoint, str(path), "16 bytes after the last tensor")


def test_deeply_nested_header(checkpoint):
    path = checkpoint / WEIGHTS
    blob = b"[" * 100_000
    path.write_bytes(len(blob).to_bytes(8, "little") + blob)
    expect_error(checkpoint, str(path), "corrupt safetensors header")
