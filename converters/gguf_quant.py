"""Which ggml type each tensor gets, and quantizing rows with ggml's own `ggml_quantize_chunk`.

Type choice follows llama.cpp (`src/llama-quant.cpp`, `convert_hf_to_gguf.py`), spec/file_formats.md
§1.8:
* every 1-D tensor, every name not ending in `.weight` and the router `ffn_gate_inp.weight` stay F32;
* F32 / F16 / BF16 / Q8_0 / Q4_0 / Q3_K / Q4_K / Q5_K / Q6_K: every other matrix gets that type;
* Q4_K_M / Q5_K_M: Q4_K / Q5_K, except the tied embedding (llama.cpp treats it as the output
  tensor) -> Q6_K, and `attn_v` / `ffn_down` / `ffn_down_exps` on llama.cpp's "more bits" layers
  (`use_more_bits`: the first and last eighth and every third layer between) -> Q6_K.  The
  Mixtral-only rule (exactly 8 experts -> attn_k/attn_v Q8_0) is not applied;
* K-quants need rows of a multiple of 256: llama.cpp's fallbacks Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, Q3_K->IQ4_NL apply (the 704/2112-wide `ffn_down_exps`, `ffn_down`, `self_cond_down`),
  and F16 when even that block does not divide the row.

The blocks come from ggml itself (ggml-python), so they are byte-identical to llama-quantize's.
"""

from __future__ import annotations

import ctypes
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from portable_dg.errors import ConfigError, FormatError
from portable_dg.threads import usable_cores

QUANT_CHOICES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                 "Q4_K_M", "Q5_K_M")
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
# llama_ftype written as general.file_type; plain K types take the closest "_S" ftype.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q3_K": 11, "Q4_K": 14, "Q4_K_M": 15,
              "Q5_K": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
# llama-quant.cpp tensor_type_fallback: the type used when a row is not a multiple of 256
K_FALLBACK = {"Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Types the reader accepts (gguf-py dequantizes them; a ggml backend runs them).
READABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                  "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
CHUNK_VALUES = 1 << 24  # float32 values converted per ggml call (64 MiB)

_BLOCK_OF = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_size(qtype: str) -> int:
    """Values per block of a ggml type (1 for F32/F16/BF16)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of n values."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n // bs * ts


def with_fallback(qtype: str, n_per_row: int) -> str:
    """qtype, or llama.cpp's substitute when rows of n_per_row values do not fit its blocks."""
    if qtype in ("F32", "F16", "BF16") or n_per_row % block_size(qtype) == 0:
        return qtype
    fallback = K_FALLBACK.get(qtype, "F16")
    return fallback if n_per_row % block_size(fallback) == 0 else "F16"


def check_quant(quant: str) -> str:
    """quant itself, or ConfigError naming the choices."""
    if quant not in QUANT_CHOICES:
        raise ConfigError(f"unknown quantization type {quant!r}; expected one of {', '.join(QUANT_CHOICES)}")
    return quant


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int,
                v_index: dict[int, int]) -> str:
    """The ggml type of GGUF tensor `name` (HF `shape`) in a file of type `quant`.

    v_index maps a block index to its position among the blocks that have `attn_v` (llama.cpp
    counts attn_v tensors, not layers, for the "more bits" rule)."""
    check_quant(quant)
    if len(shape) <= 1 or not name.endswith(".weight") or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    qtype = MIXES.get(quant, quant)
    if quant in MIXES:
        m = _BLOCK_OF.match(name)
        if name == "token_embd.weight":
            qtype = "Q6_K"
        elif m and name.endswith((".ffn_down.weight", ".ffn_down_exps.weight")) \
                and use_more_bits(int(m.group(1)), n_layers):
            qtype = "Q6_K"
        elif m and name.endswith(".attn_v.weight") and use_more_bits(v_index[int(m.group(1))], len(v_index)):
            qtype = "Q6_K"
    return with_fallback(qtype, shape[-1])


def quantize_rows(rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...], qtype: str,
                  imatrix: np.ndarray | None = None, on_rows: Callable[[int], Any] | None = None,
                  threads: int | None = None) -> np.ndarray:
    """Quantize a tensor given as a row reader into its stored bytes.

    rows(a, b) returns rows a..b-1 of the tensor viewed as [n_rows, shape[-1]] (any float dtype);
    imatrix: importance per input column, [shape[-1]], or [E, shape[-1]] for a 3-D expert tensor
    (one row per expert); on_rows(n) is told the bytes produced after every chunk of rows, in
    order; threads: chunks quantized at once (default: the usable cores).  Rows are quantized
    independently, so the bytes do not depend on the thread count.
    Returns uint8 (*shape[:-1], row_bytes(qtype, shape[-1]))."""
    n = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    out = np.empty((n_rows, row_bytes(qtype, n)), np.uint8)          # [n_rows, row_bytes]
    workers = threads or usable_cores()
    rows_per_expert = shape[1] if len(shape) == 3 else n_rows
    step = max(1, min(CHUNK_VALUES // max(n, 1), -(-rows_per_expert // workers)))
    chunks = []                                                       # (first row, end row, importance)
    for start in range(0, n_rows, rows_per_expert):                  # chunks never straddle experts
        importance = None
        if imatrix is not None:
            importance = imatrix[start // rows_per_expert] if imatrix.ndim == 2 else imatrix
        chunks += [(a, min(a + step, start + rows_per_expert), importance)
                   for a in range(start, start + rows_per_expert, step)]

    def quantize(chunk: tuple[int, int, np.ndarray | None]) -> int:
        a, b, importance = chunk
        out[a:b] = _quantize_block_rows(np.asarray(rows(a, b), np.float32), qtype, importance)
        return out[a:b].nbytes

    # ggml's quantizer and numpy's casts release the GIL, so the chunks run at once
    with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
        for nbytes in pool.map(quantize, chunks):                   # in order
            if on_rows is not None:
                on_rows(nbytes)
    return out.reshape(*shape[:-1], out.shape[-1])


def _quantize_block_rows(x: np.ndarray, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    """x float32 [r, n] -> uint8 [r, row_bytes]."""
    if qtype == "F32":
        return np.ascontiguousarray(x).view(np.uint8)
    if qtype == "F16":
        return x.astype(np.float16).view(np.uint8)
    if qtype == "BF16":
        from portable_dg.checkpoint import f32_to_bf16_bits

        return f32_to_bf16_bits(x).view(np.uint8)
    return ggml_quantize(x, qtype, importance)


def ggml_quantize(x: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk on float32 rows x [r, n] (optional importance [n]) -> uint8 [r, row_bytes]."""
    try:
        import ggml
    except ImportError:
        raise ConfigError(f"quantizing to {qtype} needs ggml-python: pip install 'portable-dg[ggml]'") from None
    from gguf import GGMLQuantizationType

    x = np.ascontiguousarray(x, np.float32)
    r, n = x.shape
    out = np.empty((r, row_bytes(qtype, n)), np.uint8)
    imatrix = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, np.float32)
        if importance.shape != (n,):
            raise FormatError(f"imatrix row has {importance.shape[0]} columns, the tensor has {n}")
        imatrix = importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = ggml.ggml_quantize_chunk(int(GGMLQuantizationType[qtype]),
                                       x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                       out.ctypes.data, 0, r, n, imatrix)
    if written != out.nbytes:
        raise FormatError(f"ggml wrote {written} bytes quantizing {r}x{n} to {qtype}, expected {out.nbytes}")
    return out
