"""A seeded mutation fuzzer for the GGUF and safetensors readers.

A few hundred mutants of a small GGUF file and of a safetensors checkpoint (a synthetic tiny model,
with a tokenizer) are each loaded in a forked child with a memory limit and a timeout
(tests/fuzz_worker.py).  Every mutant must either load or give the project's one-line error: no other
exception, no traceback, no crash, no hang, no allocation past the limit.  Mutations aim at the
headers, where the lengths, counts, types and offsets are: bit flips, "interesting" integers written
over the fields the format defines, bytes lost or inserted, spans duplicated, truncation, and (for
safetensors) edits of the JSON header itself; a few touch the tensor data, which must still load.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fuzz worker forks a child per mutant")

SEED = 20240607
MUTANTS = 250                    # per format
INTERESTING = [0, 1, 2, 7, 8, 255, 256, 0x7F, 0x80, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, (1 << 32) + 1, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 8]


def interesting(rng: random.Random, size: int) -> bytes:
    value = rng.choice(INTERESTING) % (1 << (8 * size))
    return value.to_bytes(size, "little")


def byte_mutant(rng: random.Random, data: bytes, header_end: int, fields: list[tuple[int, int]]) -> tuple[str, bytes]:
    """One generic mutation of `data`, mostly inside its first `header_end` bytes; `fields` are
    (offset, width) of the integers the format defines there."""
    kind = rng.choice(["flip", "field", "field", "word", "delete", "insert", "duplicate", "truncate", "data"])
    at = rng.randrange(header_end)
    out = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            bit = rng.randrange(8 * header_end)
            out[bit // 8] ^= 1 << bit % 8
    elif kind == "field":
        at, width = rng.choice(fields)
        out[at:at + width] = interesting(rng, width)
    elif kind == "word":
        width = rng.choice([4, 8])
        out[at:at + width] = interesting(rng, width)
    elif kind == "delete":
        del out[at:at + rng.choice([1, 4, 8, 16, 64])]
    elif kind == "insert":
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, 16])))
    elif kind == "duplicate":
        length = rng.choice([8, 16, 64, 256])
        src = rng.randrange(header_end)
        out[at:at] = out[src:src + length]
    elif kind == "truncate":
        del out[rng.randrange(len(out)):]
    else:
        for _ in range(16):
            out[rng.randrange(header_end, len(out))] = rng.randrange(256)
        kind += f"@{header_end}+"
    return f"{kind}@{at}", bytes(out)


def gguf_fields(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """(end of the tensor infos, the integer fields of the header) of a clean GGUF file."""
    from portable_dg.converters.gguf_reader import ARRAY, STRING, GGUFFile

    file = GGUFFile(path)
    fields = [(4, 4), (8, 8), (16, 8)]                               # version, tensor count, key count
    at = 24
    for key, f in file.fields.items():
        fields.append((at, 8))                                       # key length
        type_at = f.start - (16 if f.value_type == ARRAY else 4)
        fields.append((type_at, 4))
        if f.value_type == ARRAY:
            fields += [(type_at + 4, 4), (type_at + 8, 8)]           # item type, count
        if f.item_type == STRING:
            fields.append((f.start, 8))                              # (first) string length
        at = f.end
    for t in file.tensors:                                           # infos follow in file order
        n = len(t.name.encode())
        fields += [(at, 8), (at + 8 + n, 4)] + [(at + 12 + n + 8 * d, 8) for d in range(len(t.ne))]
        at += 12 + n + 8 * len(t.ne)
        fields += [(at, 4), (at + 4, 8)]                             # ggml type, data offset
        at += 12
    return at, fields


def json_mutant(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Edit one entry of a safetensors JSON header and write it back with a consistent length."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    weird = rng.choice([-1, 0, 2 ** 32, 2 ** 63, 2 ** 64, 10 ** 30, 1.5, "8", None, [], {}, True])
    kind = rng.choice(["shape", "shape", "offsets", "offsets", "dtype", "drop", "extra", "entry"])
    if kind == "shape":
        entry["shape"] = [weird if rng.random() < 0.5 else d for d in entry["shape"]] or [weird]
    elif kind == "offsets":
        entry["data_offsets"][rng.randrange(2)] = weird if rng.random() < 0.5 else rng.randrange(len(data))
    elif kind == "dtype":
        entry["dtype"] = rng.choice(["F8_E4M3", "I64", "BOOL", "U8", "F64", "X", weird])
    elif kind == "drop":
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == "extra":
        header[f"extra{rng.randrange(9)}"] = dict(entry)
    else:
        header[name] = weird
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return f"json-{kind}:{name}", len(blob).to_bytes(8, "little") + blob + data[8 + n:]


@pytest.fixture(scope="module")
def worker():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fuzz_worker.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)

    def load(kind: str, path: Path, timeout: float = 10.0) -> dict:
        proc.stdin.write(json.dumps({"kind": kind, "path": str(path), "timeout": timeout}) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())
    yield load
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from portable_dg.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("fuzz") / "tiny", "tiny", dtype="f32")


def fuzz(worker, kind: str, target: Path, mutants: list[tuple[str, bytes]]) -> Counter:
    outcomes: Counter = Counter()
    failures = []
    for i, (what, data) in enumerate(mutants):
        target.write_bytes(data)
        result = worker(kind, target)
        outcomes[result["status"]] += 1
        if result["status"] not in ("loaded", "error"):
            failures.append(f"mutant {i} ({what}): {result['status']}: {result['detail']}")
    print(f"\n{kind} fuzzer, seed {SEED}: {dict(outcomes)}")
    assert not failures, "\n".join(failures[:10])
    return outcomes


def test_gguf_mutants_load_or_fail_in_one_line(worker, synthetic, tmp_path):
    pytest.importorskip("gguf")
    from portable_dg.converters.gguf import convert_to_gguf

    clean = convert_to_gguf(synthetic, tmp_path / "clean.gguf", "Q8_0", progress=False)
    assert worker("gguf", clean)["status"] == "loaded"
    header_end, fields = gguf_fields(clean)
    data = clean.read_bytes()
    rng = random.Random(SEED)
    outcomes = fuzz(worker, "gguf", tmp_path / "mutant.gguf",
                    [byte_mutant(rng, data, header_end, fields) for _ in range(MUTANTS)])
    assert outcomes["error"] > MUTANTS // 2 and outcomes["loaded"] > 0


def test_safetensors_mutants_load_or_fail_in_one_line(worker, synthetic, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for f in synthetic.iterdir():
        if f.suffix != ".safetensors":
            (directory / f.name).write_bytes(f.read_bytes())
    data = (synthetic / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(SEED + 1)
    mutants = [json_mutant(rng, data) if rng.random() < 0.5 else byte_mutant(rng, data, header_end, [(0, 8)])
               for _ in range(MUTANTS)]
    target = directory / "model.safetensors"
    target.write_bytes(data)
    assert worker("safetensors", target)["status"] == "loaded"
    outcomes = fuzz(worker, "safetensors", target, mutants)
    assert outcomes["error"] > MUTANTS // 2 and outcomes["loaded"] > 0


def test_the_harness_catches_what_it_looks_for(worker, tmp_path):
    """A one-line error, a traceback, a hang and an allocation past the limit are told apart."""
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")
    result = worker("safetensors", path)
    assert result["status"] == "error" and "config.json: model_type None is not supported" in result["detail"]
    assert worker("raise", path)["status"] == "crash"
    assert worker("sleep", path, timeout=0.5)["status"] == "hang"
    if sys.platform == "linux":
        assert "MemoryError" in worker("allocate", path)["detail"]
