"""A thin layer over ggml-python: one ggml compute device, weights placed on it, graphs computed on it.

Weights.  On the CPU device a weight is wrapped in place (the memory-mapped bytes of the file, no
copy), or, for the types ggml's CPU backend can repack on this machine (its "CPU_REPACK" extra
buffer type: on x86 with AVX2, Q4_0, Q4_K and IQ4_NL; what a ggml build supports is asked, not
assumed), copied once into ggml's interleaved layout, which its integer GEMM kernels read
(`ggml_mul_mat` and `ggml_mul_mat_id` over 4+ rows); the file's pages of a repacked weight are then
handed back to the kernel.  On any other device (a Vulkan/CUDA/Metal build of ggml) weights are
uploaded once.

Compute.  `run` makes a one-op graph in a reused context for the per-op path (the backend keeps
activations as numpy arrays and sends only the heavy products here); `compute` runs a whole graph
built elsewhere (`graph.py`) on the thread pool.  ggml orders dimensions fastest first (`ne`), the
reverse of numpy's shape.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

import ggml

# ggml asserts that wrapped host pointers are aligned to this many bytes (TENSOR_ALIGNMENT).
ALIGNMENT = 32
# Tensor descriptors one per-call graph may create (inputs, views, the op, its result).
GRAPH_TENSORS = 16
# Below this many multiply-adds a graph runs on one thread: waking the others costs more.
ONE_THREAD_WORK = 1 << 20
# The name ggml's CPU backend gives its buffer type of repacked (interleaved) quantized weights.
REPACK_BUFFER = b"CPU_REPACK"


@dataclass
class DeviceWeight:
    """A weight on the device: its ggml tensor, plus the host bytes that back it (kept alive)."""

    tensor: Any                 # ggml_tensor_p
    host: np.ndarray            # GGUF-ordered data, the `in` dimension fastest
    ggml_type: int
    shape: tuple[int, ...]      # logical numpy shape: [out, in] or [E, out, in]; [n] for vectors
    name: str                   # the checkpoint tensor's name, for error messages
    repacked: bool = False      # held in ggml's interleaved layout (products only, no row reads)


def aligned(a: np.ndarray) -> np.ndarray:
    """`a` itself when C-contiguous and ALIGNMENT-aligned, else an aligned copy."""
    if a.flags.c_contiguous and a.ctypes.data % ALIGNMENT == 0:
        return a
    raw = np.empty(a.nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def numpy_ggml_type(dtype: np.dtype) -> int:
    """ggml type of a float32 / float16 / int32 numpy array."""
    types = {np.dtype(np.float32): ggml.GGML_TYPE_F32, np.dtype(np.float16): ggml.GGML_TYPE_F16,
             np.dtype(np.int32): ggml.GGML_TYPE_I32}
    return types[np.dtype(dtype)]


def file_backed(a: np.ndarray) -> bool:
    """Whether `a` views a memory-mapped file (whose pages the kernel may drop and read again)."""
    base: Any = a
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return False


def release_pages(a: np.ndarray) -> None:
    """Tell the kernel this process no longer needs the file pages under `a` (Linux; they are
    read from the file again if touched).  Only for arrays that view a memory-mapped file."""
    if not sys.platform.startswith("linux") or not file_backed(a):
        return
    page = mmap.PAGESIZE
    start = -(-a.ctypes.data // page) * page
    stop = (a.ctypes.data + a.nbytes) // page * page
    if stop > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), 4)      # MADV_DONTNEED


def extra_buffer_types(device: Any) -> dict[bytes, Any]:
    """The device's extra buffer types (ggml_backend_dev_get_extra_bufts), by name."""
    reg = ggml.ggml_backend_dev_backend_reg(device)
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return {}
    listing = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
    found, i = {}, 0
    while listing and listing[i]:
        found[ggml.ggml_backend_buft_name(listing[i])] = listing[i]
        i += 1
    return found


def free_allocators(allocators: list[Any]) -> None:
    """Free graph allocators (and the memory of their graphs)."""
    for allocator in allocators:
        ggml.ggml_gallocr_free(allocator)


def free_buffers(buffers: list[Any]) -> None:
    """Free backend buffers."""
    for buffer in buffers:
        ggml.ggml_backend_buffer_free(buffer)


def free(backend: Any, threadpool: Any, allocators: list[Any], graph_ctx: Any, buffers: list[Any],
         contexts: list[Any]) -> None:
    """Free an engine's ggml objects (weights' host memory belongs to their numpy arrays)."""
    free_buffers(buffers)
    for ctx in contexts + [graph_ctx]:
        ggml.ggml_free(ctx)
    free_allocators(allocators)
    ggml.ggml_backend_free(backend)
    if threadpool is not None:
        ggml.ggml_threadpool_free(threadpool)


class Engine:
    """One ggml device: its weights, and a reusable context + allocator for one-op graphs."""

    def __init__(self, n_threads: int, device: str = "auto", repack: bool = True):
        if device == "auto":
            ggml.ggml_backend_load_all()
            self.backend = ggml.ggml_backend_init_best()
        elif device == "cpu":
            self.backend = ggml.ggml_backend_cpu_init()
        else:
            ggml.ggml_backend_load_all()
            self.backend = ggml.ggml_backend_init_by_name(device.encode(), None)
        if not self.backend:
            raise RuntimeError(f"ggml could not start device {device!r}")
        self.device = ggml.ggml_backend_name(self.backend).decode()
        self.is_cpu = bool(ggml.ggml_backend_is_cpu(self.backend))
        self.ggml_device = ggml.ggml_backend_get_device(self.backend)
        props = ggml.ggml_backend_dev_props()
        ggml.ggml_backend_dev_get_props(self.ggml_device, ctypes.byref(props))
        self.wraps_host_memory = bool(props.caps.buffer_from_host_ptr)
        self.n_threads = n_threads
        self.threadpool = None
        if self.is_cpu:    # persistent workers for builds without OpenMP, which would start threads per graph
            params = ggml.ggml_threadpool_params_default(n_threads)
            self.threadpool = ggml.ggml_threadpool_new(ctypes.byref(params))
            ggml.ggml_backend_cpu_set_threadpool(self.backend, self.threadpool)
        # int8 dot-product instructions this ggml build uses (its quantized kernels' fast path)
        self.int8_dot = any(getattr(ggml, f"ggml_cpu_has_{f}")() for f in ("avx_vnni", "avx512_vnni", "dotprod",
                                                                              "matmul_int8"))
        self.repack_type = extra_buffer_types(self.ggml_device).get(REPACK_BUFFER) if self.is_cpu and repack else None
        self.buffer_type = ggml.ggml_backend_get_default_buffer_type(self.backend)
        self.allocators: list[Any] = [ggml.ggml_gallocr_new(self.buffer_type)]
        size = ggml.ggml_tensor_overhead() * GRAPH_TENSORS + ggml.ggml_graph_overhead()
        self.graph_memory = ctypes.create_string_buffer(size)
        self.graph_ctx = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=size, mem_buffer=ctypes.cast(self.graph_memory, ctypes.c_void_p), no_alloc=True))
        self.weight_buffers: list[Any] = []
        self.weight_contexts: list[Any] = []
        weakref.finalize(self, free, self.backend, self.threadpool, self.allocators, self.graph_ctx,
                         self.weight_buffers, self.weight_contexts)

    # --- weights ------------------------------------------------------------------------------
    def weight(self, host: np.ndarray, ggml_type: int, shape: Sequence[int], name: str = "weight",
               repack: bool = False) -> DeviceWeight:
        """Place a weight whose bytes `host` hold `shape` (numpy order) in ggml type `ggml_type`;
        `repack`: into ggml's interleaved layout when this device has one for the type (the
        weight is then only used by products)."""
        if not 0 <= ggml_type < ggml.GGML_TYPE_COUNT or ggml.ggml_blck_size(ggml_type) == 0:
            raise ValueError(f"ggml type {ggml_type} is not one this ggml build knows")
        if shape[-1] % ggml.ggml_blck_size(ggml_type):
            raise ValueError(f"rows of {shape[-1]} values do not fill whole blocks of "
                             f"{ggml.ggml_type_name(ggml_type).decode()}")
        host = aligned(host)
        expected = ggml.ggml_row_size(ggml_type, shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64))
        if expected != host.nbytes:
            raise ValueError(f"{expected} bytes expected for shape {list(shape)}, got {host.nbytes}")
        if repack and self.repack_type is not None and len(shape) in (2, 3):
            tensor = self.repacked(host, ggml_type, shape)
            if tensor is not None:
                release_pages(host)
                return DeviceWeight(tensor, host, ggml_type, tuple(shape), name, repacked=True)
        tensor = self.new_weight_tensor(ggml_type, shape)
        nbytes = host.nbytes
        # (ggml-python 0.0.45 declares ggml_backend_cpu_buffer_from_ptr, ggml_backend_alloc_buffer and
        # ggml_backend_cpu_buffer_type with a 32-bit result, truncating the pointer: use the
        # device/buffer-type calls instead.)
        if self.wraps_host_memory:  # wrap the host bytes in place: no copy, stays memory-mapped
            buffer = ggml.ggml_backend_dev_buffer_from_host_ptr(self.ggml_device, host.ctypes.data,
                                                                nbytes, nbytes)
            ggml.ggml_backend_tensor_alloc(buffer, tensor, host.ctypes.data)
        else:                       # upload once to device memory
            buffer = ggml.ggml_backend_buft_alloc_buffer(self.buffer_type, nbytes)
            ggml.ggml_backend_tensor_alloc(buffer, tensor, ggml.ggml_backend_buffer_get_base(buffer))
            self.write(tensor, host)
        self.weight_buffers.append(buffer)
        return DeviceWeight(tensor, host, ggml_type, tuple(shape), name)

    def new_weight_tensor(self, ggml_type: int, shape: Sequence[int]) -> Any:
        """A weight tensor descriptor in a context of its own."""
        ne = list(reversed(shape))
        ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=ggml.ggml_tensor_overhead(),
                                                   mem_buffer=None, no_alloc=True))
        self.weight_contexts.append(ctx)
        return ggml.ggml_new_tensor(ctx, ggml_type, len(ne), (ctypes.c_int64 * len(ne))(*ne))

    def repacked(self, host: np.ndarray, ggml_type: int, shape: Sequence[int]) -> Any | None:
        """The weight copied into the repack buffer type, or None when ggml has no interleaved
        layout for this type and shape here (its buffer leaves `extra` empty then)."""
        tensor = self.new_weight_tensor(ggml_type, shape)
        size = ggml.ggml_backend_buft_get_alloc_size(self.repack_type, tensor)
        buffer = ggml.ggml_backend_buft_alloc_buffer(self.repack_type, size)
        if not buffer:
            return None
        ggml.ggml_backend_tensor_alloc(buffer, tensor, ggml.ggml_backend_buffer_get_base(buffer))
        if not tensor.contents.extra:
            ggml.ggml_backend_buffer_free(buffer)
            return None
        self.write(tensor, host)                                                      # repacks
        self.weight_buffers.append(buffer)
        return tensor

    # --- one-op graphs ------------------------------------------------------------------------
    def run(self, op: Callable[..., Any], inputs: Sequence[Any], out_shape: Sequence[int],
            work: int) -> np.ndarray:
        """Compute op(ctx, *tensors) -> float32 numpy `out_shape`.

        inputs: DeviceWeights (used as they are) and numpy arrays (float32/float16/int32, copied
        to the device for this call); work: the op's multiply-adds (picks the thread count)."""
        ctx = self.graph_ctx
        ggml.ggml_reset(ctx)
        tensors, uploads = [], []
        for x in inputs:
            if isinstance(x, DeviceWeight):
                tensors.append(x.tensor)
                continue
            x = np.ascontiguousarray(x)
            ne = list(reversed(x.shape))
            t = ggml.ggml_new_tensor(ctx, numpy_ggml_type(x.dtype), len(ne), (ctypes.c_int64 * len(ne))(*ne))
            ggml.ggml_set_input(t)
            tensors.append(t)
            uploads.append((t, x))
        result = op(ctx, *tensors)
        ggml.ggml_set_output(result)
        graph = ggml.ggml_new_graph(ctx)
        ggml.ggml_build_forward_expand(graph, result)
        if not ggml.ggml_gallocr_alloc_graph(self.allocators[0], graph):
            raise RuntimeError("ggml could not allocate the graph")
        for t, x in uploads:
            self.write(t, x)
        self.compute(graph, 1 if work < ONE_THREAD_WORK else self.n_threads)
        out = np.empty(tuple(out_shape), np.float32)
        if ggml.ggml_nbytes(result) != out.nbytes:
            raise ValueError(f"ggml result has {ggml.ggml_nbytes(result)} bytes, expected shape {list(out_shape)}")
        ggml.ggml_backend_tensor_get(result, out.ctypes.data, 0, out.nbytes)
        return out

    # --- whole graphs -------------------------------------------------------------------------
    def compute(self, graph: Any, n_threads: int | None = None) -> None:
        """Compute an allocated graph on the device (CPU: on `n_threads` of the pool)."""
        if self.is_cpu:
            ggml.ggml_backend_cpu_set_n_threads(self.backend, n_threads or self.n_threads)
        status = ggml.ggml_backend_graph_compute(self.backend, graph)
        if status != ggml.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed with status {status}")

    def write(self, tensor: Any, array: np.ndarray) -> None:
        """Copy a C-contiguous numpy array into an allocated tensor of the same size."""
        ggml.ggml_backend_tensor_set(tensor, array.ctypes.data, 0, array.nbytes)

    def read(self, tensor: Any, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A contiguous tensor's values as a numpy array: a read-only view of host memory (valid
        until the tensor's graph runs again) or, on other devices, a copy."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if ggml.ggml_backend_buffer_is_host(tensor.contents.buffer):
            raw = (ctypes.c_char * nbytes).from_address(tensor.contents.data)
            out = np.frombuffer(raw, dtype).reshape(shape)
            out.flags.writeable = False
            return out
        out = np.empty(tuple(shape), dtype)
        ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, nbytes)
        return out


def quantize(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 [..., n] -> ggml blocks uint8 [rows, row_bytes] through ggml's own quantizer."""
    n = w.shape[-1]
    src = np.ascontiguousarray(w, np.float32).reshape(-1, n)
    out = np.empty((src.shape[0], ggml.ggml_row_size(ggml_type, n)), np.uint8)
    ggml.ggml_quantize_chunk(ggml_type, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data,
                             0, src.shape[0], n, None)
    return out
