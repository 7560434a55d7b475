"""A bounded, lazy GGUF parser (format v2/v3, as llama.cpp's `gguf.cpp` reads it).

`GGUFFile(path)` memory-maps the file and walks its header, metadata and tensor infos once.  Every
count and length read from the file (key and string lengths, array lengths, dimensions, offsets) is
checked against the bytes left in the file *before* anything is read or allocated with it, so a
corrupt file is a one-line `FormatError` at once, never minutes of walking a claimed array or a
huge allocation.  Metadata values are decoded only when asked for (`value(key)`), so describing a
file with a 262144-token vocabulary and half a million merges does not build a Python object for
every token; tensors are read-only views of the memory map.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from portable_dg.errors import CheckpointError, FormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4                     # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUF value type id -> (name, numpy dtype of one item; None for STRING / ARRAY)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<u8"), 11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
STRING, ARRAY = 8, 9
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class Field:
    """Where one metadata value lies: `count` items of `item_type` from byte `start` to `end`."""

    key: str
    value_type: int          # GGUF value type id
    item_type: int           # the element type of an ARRAY; value_type otherwise
    count: int               # array length; 1 for a scalar or a string
    start: int               # first byte of the value (of the first item, for arrays)
    end: int

    @property
    def type_name(self) -> str:
        """gguf-py's spelling: "UINT32", "STRING", "ARRAY:INT32", ..."""
        name = VALUE_TYPES[self.value_type][0]
        return f"{name}:{VALUE_TYPES[self.item_type][0]}" if self.value_type == ARRAY else name


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `ne` in GGUF order (fastest axis first), its ggml type and where its bytes are."""

    name: str
    ne: tuple[int, ...]
    ggml_type: int
    qtype: str               # ggml type name, e.g. "Q4_K"
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The Hugging Face (numpy) shape: `ne` reversed."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)


class GGUFFile:
    """A parsed GGUF file: `fields` (key -> Field), `tensors` (in file order), lazy values."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = f.seek(0, 2)
                if self.size < 24:
                    raise FormatError(f"{self.path}: truncated GGUF file ({self.size} bytes, no header)")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorInfo] = []
        self.cache: dict[str, Any] = {}
        self.parse()

    # --- parsing -----------------------------------------------------------------------------------
    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: corrupt or truncated GGUF file: {what}")

    def need(self, at: int, n: int, what: str) -> None:
        """Raise unless n bytes starting at `at` lie inside the file."""
        if n < 0 or at + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at byte {at}, the file has {self.size}")

    def u32(self, at: int, what: str) -> int:
        self.need(at, 4, what)
        return U32.unpack_from(self.map, at)[0]

    def u64(self, at: int, what: str) -> int:
        self.need(at, 8, what)
        return U64.unpack_from(self.map, at)[0]

    def string_end(self, at: int, what: str) -> int:
        n = self.u64(at, what)
        self.need(at + 8, n, what)
        return at + 8 + n

    def text(self, at: int, end: int, what: str) -> str:
        try:
            return bytes(self.map[at + 8:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def parse(self) -> None:
        magic, version = bytes(self.map[:4]), self.u32(4, "version")
        if magic != MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        if version not in VERSIONS:
            raise FormatError(f"{self.path}: GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_kv = self.u64(8, "tensor count"), self.u64(16, "key count")
        # smallest possible entries: key length + type + one byte; name length + n_dims + type + offset
        if n_kv * 13 + n_tensors * 32 > self.size - 24:
            raise FormatError(f"{self.path}: header claims {n_kv} metadata keys and {n_tensors} tensors, "
                              f"more than a {self.size}-byte file can hold (truncated or corrupt)")
        at = 24
        for i in range(n_kv):
            at = self.parse_field(at, i)
        for i in range(n_tensors):
            at = self.parse_tensor_info(at, i)
        alignment = self.alignment()
        data_start = at + -at % alignment
        self.tensors = [self.place(t, data_start, alignment) for t in self.tensors]
        self.check_overlaps()

    def parse_field(self, at: int, index: int) -> int:
        key_end = self.string_end(at, f"metadata key {index}")
        key = self.text(at, key_end, f"metadata key {index}")
        vtype = self.u32(key_end, f"the type of {key}")
        if vtype not in VALUE_TYPES:
            raise self.fail(f"metadata key {key} has unknown value type {vtype}")
        start = key_end + 4
        item, count = vtype, 1
        if vtype == ARRAY:
            item, count = self.u32(start, f"the item type of {key}"), self.u64(start + 4, f"the length of {key}")
            if item not in VALUE_TYPES or item == ARRAY:
                raise self.fail(f"metadata key {key} is an array of unsupported type {item}")
            start += 12
        end = self.skip_values(start, item, count, key)
        if key in self.fields:
            raise self.fail(f"metadata key {key} appears twice")
        self.fields[key] = Field(key, vtype, item, count, start, end)
        return end

    def skip_values(self, at: int, item: int, count: int, key: str) -> int:
        """The end of `count` values of type `item` starting at `at`, each length checked first."""
        dtype = VALUE_TYPES[item][1]
        if dtype is not None:
            self.need(at, count * np.dtype(dtype).itemsize, f"the value of {key} ({count} items)")
            return at + count * np.dtype(dtype).itemsize
        self.need(at, 8 * count, f"the value of {key} ({count} strings)")
        unpack, size, view = U64.unpack_from, self.size, self.map
        for _ in range(count):
            if at + 8 > size:
                break
            at += 8 + unpack(view, at)[0]
        else:
            if at <= size:
                return at
        raise self.fail(f"the strings of {key} run past the end of the file")

    def parse_tensor_info(self, at: int, index: int) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name_end = self.string_end(at, f"the name of tensor {index}")
        name = self.text(at, name_end, f"the name of tensor {index}")
        n_dims = self.u32(name_end, f"the rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = tuple(self.u64(name_end + 4 + 8 * d, f"the shape of {name}") for d in range(n_dims))
        at = name_end + 4 + 8 * n_dims
        ggml_type, offset = self.u32(at, f"the type of {name}"), self.u64(at + 4, f"the offset of {name}")
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name} has unknown ggml type {ggml_type}") from None
        if 0 in ne:
            raise self.fail(f"tensor {name} has shape {list(ne)}, with a dimension of 0")
        if ne[0] % block:
            raise self.fail(f"tensor {name} has rows of {ne[0]} values, not a multiple of "
                            f"{qtype.name}'s block of {block}")
        nbytes = math.prod(ne) // block * type_size                 # Python ints: no overflow
        self.tensors.append(TensorInfo(name, ne, ggml_type, qtype.name, offset, nbytes))
        return at + 12

    def alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        value = self.value("general.alignment")
        if field.type_name != "UINT32" or value <= 0 or value & (value - 1):
            raise self.fail(f"general.alignment is {value!r}, expected a power of two (UINT32)")
        return value

    def place(self, t: TensorInfo, data_start: int, alignment: int) -> TensorInfo:
        """The tensor with its absolute offset, checked to be aligned and inside the file."""
        if t.offset % alignment:
            raise self.fail(f"tensor {t.name} starts at data offset {t.offset}, not a multiple of {alignment}")
        start = data_start + t.offset
        if start + t.nbytes > self.size:
            raise FormatError(f"{self.path}: truncated: tensor {t.name} needs bytes {start}.."
                              f"{start + t.nbytes}, the file has {self.size}")
        return TensorInfo(t.name, t.ne, t.ggml_type, t.qtype, start, t.nbytes)

    def check_overlaps(self) -> None:
        names, end, previous = set(), 0, ""
        for t in sorted(self.tensors, key=lambda t: t.offset):
            if t.name in names:
                raise self.fail(f"tensor {t.name} appears twice")
            if t.offset < end:
                raise self.fail(f"tensor {t.name} overlaps tensor {previous}")
            names.add(t.name)
            end, previous = max(end, t.offset + t.nbytes), t.name

    # --- values ------------------------------------------------------------------------------------
    def value(self, key: str) -> Any:
        """The decoded value of a metadata key: int, float, bool, str, or a list of them."""
        if key not in self.cache:
            self.cache[key] = self.decode(self.fields[key])
        return self.cache[key]

    def decode(self, field: Field) -> Any:
        if field.item_type == STRING:
            values = self.strings(field)
            return values if field.value_type == ARRAY else values[0]
        dtype = VALUE_TYPES[field.item_type][1]
        array = np.frombuffer(self.map, dtype=dtype, count=field.count, offset=field.start)
        if field.item_type == 7:
            array = array.astype(bool)
        if field.value_type == ARRAY:
            return array.tolist()
        if field.item_type == 6:      # the decimal it was written from: 0.4, not 0.4000000059604645
            return float(str(array[0]))
        return array[0].item()

    def strings(self, field: Field) -> list[str]:
        out, at, view = [], field.start, self.map
        unpack = U64.unpack_from
        try:
            for _ in range(field.count):
                n = unpack(view, at)[0]
                out.append(bytes(view[at + 8:at + 8 + n]).decode("utf-8"))
                at += 8 + n
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: metadata key {field.key} holds a string that is not "
                              f"UTF-8 (item {len(out)})") from None
        return out

    def data(self, t: TensorInfo) -> np.ndarray:
        """The stored bytes of a tensor: a read-only uint8 view [nbytes] of the memory map."""
        return np.frombuffer(self.map, dtype=np.uint8, count=t.nbytes, offset=t.offset)


class Metadata(abc.Mapping):
    """key -> decoded value of a GGUFFile, decoding each key on first access."""

    def __init__(self, file: GGUFFile):
        self.file = file

    def __getitem__(self, key: str) -> Any:
        if key not in self.file.fields:
            raise KeyError(key)
        return self.file.value(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file.fields)

    def __len__(self) -> int:
        return len(self.file.fields)
