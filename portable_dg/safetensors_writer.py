"""Streaming safetensors writing, shared by every converter and `pdg synth`.

The header is computed from the planned entries (names, stored dtypes, shapes) before any data
exists, then the data is streamed chunk by chunk, so memory stays at one chunk however large the
checkpoint.  `split_shards` cuts a plan into files of at most `max_bytes` and `write_index`
writes `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from .checkpoint import SAFETENSORS_DTYPES, f32_to_bf16_bits  # noqa: F401 (re-exported for writers)
from .errors import FormatError

MAX_SHARD_BYTES = 5 << 30
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One stored tensor: safetensors name, dtype string ("BF16", "F32", "U32", ...), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[self.dtype]).itemsize


def split_shards(items: Sequence[T], nbytes: Callable[[T], int],
                 max_bytes: int = MAX_SHARD_BYTES) -> list[list[T]]:
    """Consecutive groups of items of at most max_bytes each (a bigger item gets its own group)."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def header_bytes(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed JSON header of one file, padded with spaces to 8-byte alignment."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, entries: Sequence[Entry], chunks: Iterable[np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write the header for `entries`, then the chunks' bytes in order (the entries' data,
    concatenated, in any chunking).  Raises FormatError if the bytes do not match the plan."""
    expected = sum(e.nbytes for e in entries)
    written = 0
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for chunk in chunks:
            data = np.ascontiguousarray(chunk)
            written += data.nbytes
            if written > expected:
                break
            f.write(data.tobytes())
    if written != expected:
        raise FormatError(f"internal: {path} got {written} bytes of tensor data for a header "
                          f"planning {expected}")


def write_index(directory: str | Path, shards: Sequence[tuple[str, Sequence[Entry]]],
                total_parameters: int | None = None) -> None:
    """model.safetensors.index.json for (file name, entries) pairs; weight_map sorted by name."""
    weight_map = {e.name: file for file, entries in shards for e in entries}
    meta: dict[str, int] = {"total_size": sum(e.nbytes for _, entries in shards for e in entries)}
    if total_parameters is not None:
        meta["total_parameters"] = total_parameters
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
