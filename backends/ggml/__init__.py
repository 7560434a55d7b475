"""The ggml backend: the llama.cpp-style CPU path, with GGUF weights kept quantized in memory.

Two ways to run.  The denoising step (the decoder pass plus the sampler's per-step work) is traced
into whole ggml graphs once per shape and replayed (`compile_step`, see `graph.py`): every product,
norm, attention and elementwise op of the pass runs in ggml on its thread pool, and only the
sampler's token statistics and decisions run in numpy.  Everything else (the encoder passes over
prompts and committed canvases, and the per-op API) runs op by op: activations are float32 numpy
arrays, so every elementwise, attention and sampler op is the numpy reference backend's (inherited,
not copied), and the heavy products go to ggml one op at a time.

Weights (2-D and stacked 3-D) live in ggml in their stored type (F32, F16, BF16, Q8_0, Q4_0,
K-quants, ...), wrapped in place over the memory-mapped file bytes; the types ggml's CPU backend can
repack into its interleaved layout on this machine (x86 AVX2: Q4_0, Q4_K, IQ4_NL) are repacked once
at load time for its integer GEMM kernels (`repack=False` keeps them in place).  The tied embedding
is never repacked: it is also read row by row.  Vectors stay float32 numpy arrays (and constant
ggml tensors for the graphs).

On the per-op path, a dense product over at least `blas_min_tokens` rows (a 256-token canvas, a
prompt) on the CPU device runs in numpy's BLAS unless its weight is repacked: F32 weights on their
host memory, quantized ones dequantized tile by tile with ggml's own `to_float` (bounded memory,
never a full copy).  The experts stay in `ggml_mul_mat_id` unless F32.  The self-conditioning soft
lookup (a [T, V] @ [V, H] product ggml has no kernel for with the table stored as rows of H) goes
through tiles: numpy's BLAS on the per-op path, ggml's float32 GEMM over transposed tiles in the
graphs.  A ggml built with Vulkan, CUDA or Metal is used when present (`device="auto"`).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np

from portable_dg.backends.numpy import NumpyBackend
from portable_dg.errors import BackendUnavailable, CheckpointError, ConfigError
from portable_dg.threads import default_threads

# The tied embedding: read row by row (embedding, soft lookup), so never repacked.
EMBEDDING = "model.decoder.embed_tokens.weight"

# Formats whose tensors `weight()` takes without dequantizing them first.
FORMATS = ("hf", "gguf")
# An F32 product with at least this many rows runs in numpy's BLAS on the CPU device; fewer run in
# ggml (a ggml call costs ~30 us; numpy's F32 GEMM is 3-5x ggml's F32 kernel on large products).
BLAS_MIN_TOKENS = 32
# float32 values per dequantized tile (16 MiB): bounds the memory the BLAS route adds.
TILE_VALUES = 1 << 22


class GgmlBackend(NumpyBackend):
    """Implements `portable_dg.backend.Backend` on ggml; activations are float32 numpy arrays."""

    name = "ggml"

    def __init__(self, engine: Any, n_threads: int, blas_min_tokens: int, graphs: bool = True):
        super().__init__("float32")
        self.engine = engine
        self.n_threads = n_threads
        self.pool = ThreadPoolExecutor(n_threads)    # parallel dequantization and token statistics
        self.blas_min_tokens = blas_min_tokens
        self.graphs = graphs
        self.vectors: dict[str, Any] = {}            # name -> DeviceWeight of a vector (graph constant)
        self.traces: OrderedDict = OrderedDict()     # the step's ggml graphs by shape (graph.GraphStep)
        self.blas_threads = blas_controller()

    # --- weights --------------------------------------------------------------------------------
    def weight(self, name: str, value: Any) -> Any:
        """Vectors -> float32 numpy; 2-D/3-D weights -> a DeviceWeight in their stored ggml type."""
        import ggml

        if hasattr(value, "ggml_type") and hasattr(value, "data"):      # a GGUF tensor, as stored
            shape, ggml_type, host = tuple(value.shape), int(value.ggml_type), np.asarray(value.data)
            if len(shape) <= 1:
                return self.vector(name, value.dequantize())
        else:
            array = np.asarray(value.dequantize() if hasattr(value, "dequantize") else value)
            if array.dtype.kind != "f":
                raise CheckpointError(f"{name}: expected a float tensor, got {array.dtype}")
            if array.ndim <= 1:
                return self.vector(name, array)
            if array.dtype != np.float16:
                array = np.asarray(array, np.float32)
            shape, ggml_type, host = array.shape, int(ggml.GGML_TYPE_F16 if array.dtype == np.float16
                                                      else ggml.GGML_TYPE_F32), array
        if len(shape) not in (2, 3):
            raise CheckpointError(f"{name}: expected a 2-D or 3-D weight, got shape {list(shape)}")
        try:
            return self.engine.weight(np.ascontiguousarray(host), ggml_type, shape, name, repack=name != EMBEDDING)
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from None

    def vector(self, name: str, value: np.ndarray) -> np.ndarray:
        """A float32 vector, also placed on the device as a constant of the step's graphs."""
        import ggml

        array = np.ascontiguousarray(value, np.float32).reshape(np.shape(value))
        self.vectors[name] = self.engine.weight(array.reshape(-1), ggml.GGML_TYPE_F32, (array.size,), name)
        return self.vectors[name].host.reshape(array.shape)

    def compile_step(self, fn: Any) -> Any:
        """The denoising step as whole ggml graphs (`graph.GraphStep`), unless graphs are off."""
        from .graph import GraphStep

        return GraphStep(fn, self) if self.graphs else fn

    def check_input(self, x: np.ndarray, w: Any) -> np.ndarray:
        """x as contiguous float32 whose last axis matches w's `in` (ggml would abort otherwise)."""
        if x.shape[-1] != w.shape[-1]:
            raise ConfigError(f"{w.name}: input has {x.shape[-1]} features, the weight "
                              f"{list(w.shape)} expects {w.shape[-1]}")
        return np.ascontiguousarray(x, np.float32)

    def check_ids(self, ids: np.ndarray, limit: int, w: Any) -> np.ndarray:
        """ids as int32 in [0, limit) (ggml would abort on an out-of-range row)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= limit):
            raise ConfigError(f"{w.name}: ids must lie in [0, {limit}), "
                              f"got {int(ids.min())}..{int(ids.max())}")
        return np.ascontiguousarray(ids, np.int32)

    def blas_route(self, w: Any, rows: int) -> bool:
        """Whether products of `rows` tokens (per expert, for stacked experts) with weight w run as
        dequantized tiles through numpy's BLAS: on the CPU device, from `blas_min_tokens` rows, for
        weights ggml has no interleaved (repacked) kernel for here, when they are F32 or the CPU has
        no int8 dot-product instructions (measured on AVX2 without VNNI: ggml's other quantized
        kernels run at 40-60 GFLOP/s a core there against 80-90 for float32 BLAS, see
        bench/RESULTS.md).  Elsewhere the product runs in ggml."""
        import ggml

        return (self.engine.is_cpu and rows >= self.blas_min_tokens and not w.repacked
                and (w.ggml_type == ggml.GGML_TYPE_F32 or not self.engine.int8_dot))

    def products_in_ggml(self, network: Any, rows: int) -> bool:
        """Whether any weight product of a pass over `rows` tokens runs in ggml (not numpy's BLAS);
        stacked experts see rows * k / E tokens each."""
        cfg = network.config
        per_expert = rows * cfg.top_k_experts // cfg.num_experts
        return any(not self.blas_route(w, per_expert if len(w.shape) == 3 else rows)
                   for name, w in network.weights.items() if name != EMBEDDING and len(getattr(w, "shape", ())) > 1)

    def token_stats(self, logits: np.ndarray, uniforms: np.ndarray | None):
        """The reference's token statistics, blocks of rows split over the threads (numpy releases
        the GIL in its loops; rows are independent, so the results are the reference's); each
        block's temporaries hold at most TILE_VALUES values."""
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        u = None if uniforms is None else np.asarray(uniforms).reshape(-1)
        step = max(1, min(-(-flat.shape[0] // self.n_threads), TILE_VALUES // V))   # temporaries [step, V]
        parts = list(self.pool.map(lambda a: NumpyBackend.token_stats(
            self, flat[a:a + step], None if u is None else u[a:a + step]), range(0, flat.shape[0], step)))
        return tuple(np.concatenate(column).reshape(logits.shape[:-1]) for column in zip(*parts))

    # --- products -------------------------------------------------------------------------------
    def embedding(self, table: Any, ids: np.ndarray) -> np.ndarray:
        import ggml

        flat = self.check_ids(np.asarray(ids).reshape(-1), table.shape[0], table)
        if table.repacked:               # ggml's get_rows reads the stored layout: rows from the file's bytes
            rows = np.concatenate([self.float_rows(table, int(i), int(i) + 1) for i in flat]) if len(flat) \
                else np.zeros((0, table.shape[1]), np.float32)
        else:
            rows = self.engine.run(ggml.ggml_get_rows, [table, flat], (len(flat), table.shape[1]),
                                   work=len(flat) * table.shape[1])
        return rows.reshape(*np.shape(ids), table.shape[1])

    def linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        import ggml

        lead = x.shape[:-1]
        x = self.check_input(x, w).reshape(-1, w.shape[-1])                      # tokens [T, in]
        T, out = x.shape[0], w.shape[0]
        if self.blas_route(w, T):                                  # dequantized tiles through BLAS
            y = np.empty((T, out), np.float32)
            with self.blas():
                for a, b in tiles(w, out):
                    y[:, a:b] = x @ self.float_rows(w, a, b).T
        else:
            y = self.engine.run(ggml.ggml_mul_mat, [w, x], (T, out), work=T * out * x.shape[1])
        return y.reshape(*lead, out)

    def soft_embedding(self, logits: np.ndarray, table: Any) -> np.ndarray:
        """softmax(logits) @ table, tile by tile over the vocabulary: each table tile is dequantized
        once per call and the probabilities are made tile by tile (temporaries [rows, tile])."""
        V, H = table.shape
        if logits.shape[-1] != V:
            raise ConfigError(f"{table.name}: logits over {logits.shape[-1]} tokens, the table has {V}")
        flat = np.ascontiguousarray(logits.reshape(-1, V), np.float32)             # [R, V]
        peak = flat.max(axis=-1, keepdims=True)
        total = np.zeros_like(peak)
        for start, stop in tiles(table, V):                                          # temporaries [R, tile]
            total += np.exp(flat[:, start:stop] - peak).sum(axis=-1, keepdims=True)
        out = np.zeros((flat.shape[0], H), np.float32)
        with self.blas():
            for start, stop in tiles(table, V):
                probs = np.exp(flat[:, start:stop] - peak)
                probs /= total
                out += probs @ self.float_rows(table, start, stop)
        return out.reshape(*logits.shape[:-1], H)

    def expert_linear(self, x: np.ndarray, w: Any, ids: np.ndarray) -> np.ndarray:
        import ggml

        E, out, _ = w.shape
        T, k = ids.shape
        x = self.check_input(x, w)
        ids = self.check_ids(ids, E, w)
        if x.shape[0] != T or (x.ndim == 3 and x.shape[1] != k):
            raise ConfigError(f"{w.name}: input {list(x.shape)} does not match ids {[T, k]}")
        used = np.unique(ids)
        if not self.blas_route(w, T * k // len(used)):      # rows per expert GEMM decide the route
            b = x[:, None, :] if x.ndim == 2 else x                     # [T, 1 or k, in]
            return self.engine.run(ggml.ggml_mul_mat_id, [w, b, ids], (T, k, out), work=T * k * out * w.shape[-1])
        y = np.empty((T, k, out), np.float32)
        with self.blas():
            for e in used:                           # group tokens by expert: one GEMM per expert
                t, j = np.nonzero(ids == e)
                rows = x[t] if x.ndim == 2 else x[t, j]  # [n, in]
                y[t, j] = rows @ self.float_rows(w, int(e) * out, (int(e) + 1) * out).T
        return y

    def blas(self) -> Any:
        """numpy's BLAS limited to this backend's threads inside the block (threadpoolctl, when
        installed: more BLAS threads than idle cores wait on each other, see `portable_dg.threads`)."""
        if self.blas_threads is None:
            return nullcontext()
        return self.blas_threads.limit(limits=self.n_threads, user_api="blas")

    def float_rows(self, w: Any, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of w flattened to [rows, in] as float32: a view of the host memory
        for F32, else a new array dequantized by ggml's `to_float`, split over the threads."""
        import ggml

        if w.ggml_type == ggml.GGML_TYPE_F32:
            return w.host.view(np.float32).reshape(-1, w.shape[-1])[start:stop]
        out = np.empty((stop - start, w.shape[-1]), np.float32)
        step = -(-(stop - start) // self.n_threads)          # rows per thread, rounded up
        parts = [(a, min(stop, a + step)) for a in range(start, stop, step)]
        list(self.pool.map(lambda p: dequantize_into(w, p[0], p[1], out[p[0] - start:p[1] - start]), parts))
        return out


def tiles(w: Any, rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of w's first `rows` rows: everything at once for F32 (a view),
    else at most TILE_VALUES dequantized values each."""
    import ggml

    step = rows if w.ggml_type == ggml.GGML_TYPE_F32 else max(1, TILE_VALUES // w.shape[-1])
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def dequantize_into(w: Any, start: int, stop: int, out: np.ndarray) -> None:
    """Dequantize rows start..stop-1 of w (flattened to [rows, in]) into float32 `out`; ctypes
    releases the GIL for the call, so threads run these in parallel."""
    import ggml

    n = w.shape[-1]
    to_float = ggml.ggml_get_type_traits(w.ggml_type).contents.to_float
    to_float(w.host.ctypes.data + start * ggml.ggml_row_size(w.ggml_type, n),
             out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), (stop - start) * n)


def create(n_threads: int | None = None, device: str = "auto", blas_min_tokens: int = BLAS_MIN_TOKENS,
           graphs: bool | None = None, repack: bool = True, **options: Any) -> GgmlBackend:
    """Backend factory used by `portable_dg.backends.get_backend`.

    Args:
        n_threads: CPU threads for ggml and the BLAS products (default: the cores this process may
            run on that other work leaves idle now, `portable_dg.threads.default_threads`).
        device: "cpu", "auto" (the best device the installed ggml provides: Vulkan/CUDA/Metal when
            built with them) or a ggml device name such as "Vulkan0".
        blas_min_tokens: products over at least this many rows run as dequantized tiles through
            numpy's BLAS on the CPU device (per-op path); a huge value keeps every product in ggml.
        graphs: run the denoising step as whole ggml graphs (False: op by op; default: on the CPU
            device only: on Vulkan (lavapipe) the graphs' passes match the reference, but whole
            generations crashed intermittently inside ggml-vulkan, see the README).
        repack: repack the weight types ggml's CPU backend has interleaved kernels for."""
    if options:
        raise ConfigError(f"ggml backend: unknown option(s) {', '.join(sorted(options))}")
    try:
        import ggml  # noqa: F401
    except (ImportError, OSError) as e:
        raise BackendUnavailable(f"backend 'ggml' needs the ggml-python package ({e}): "
                                 "pip install 'portable-dg[ggml]'") from None
    from .engine import Engine

    threads = n_threads or default_threads()
    if threads < 1 or blas_min_tokens < 1:
        raise ConfigError("ggml backend: n_threads and blas_min_tokens must be positive")
    try:
        engine = Engine(threads, device, repack=bool(repack))
    except RuntimeError as e:
        raise BackendUnavailable(f"ggml backend: {e}") from None
    return GgmlBackend(engine, threads, blas_min_tokens, graphs=engine.is_cpu if graphs is None else bool(graphs))


def blas_controller() -> Any:
    """threadpoolctl's controller of this process's BLAS libraries, or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()
