"""GGUF files in the DiffusionGemma layout of llama.cpp PR #24423 (spec/file_formats.md §1).

`GGUFTensor` is what the reader hands to backends for a quantized tensor: the raw, memory-mapped
blocks plus enough to dequantize them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, kept in its stored (possibly quantized) form.

    `data` holds the stored bytes as uint8, shape (*shape[:-1], row_bytes): GGUF order, i.e. the
    HF shape with each row of `shape[-1]` values packed into `row_bytes` bytes of blocks.  It is a
    read-only view of the memory-mapped file unless the reader had to assemble it (split experts).
    """

    name: str                  # GGUF tensor name, e.g. "blk.0.ffn_gate_up_exps.weight"
    shape: tuple[int, ...]     # logical Hugging Face shape, e.g. (E, 2 * I, H)
    qtype: str                 # ggml type name, e.g. "Q4_K", "Q8_0", "BF16"
    ggml_type: int             # ggml_type enum value, e.g. 12 for Q4_K
    data: np.ndarray           # uint8 (*shape[:-1], row_bytes)

    def dequantize(self) -> np.ndarray:
        """The values as float32 in the HF shape (numpy dequantization of gguf-py)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.data, GGMLQuantizationType(self.ggml_type))
        return np.asarray(values, dtype=np.float32).reshape(self.shape)
