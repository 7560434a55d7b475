"""A thin layer over ggml-python: one ggml compute device, weights placed on it, one-op graphs.

The backend keeps activations as numpy arrays and sends only the heavy products to ggml.  Each call
builds a tiny graph (one op and its inputs) in a reused metadata context, lets a reused graph
allocator place the inputs and the result in device memory, copies the inputs in, computes, and
copies the result out.  On the CPU device, weights are wrapped in place (the memory-mapped bytes
of the file, no copy); on any other device (a Vulkan/CUDA/Metal build of ggml) they are uploaded
once.  ggml orders dimensions fastest first (`ne`), the reverse of numpy's shape.
"""

from __future__ import annotations

import ctypes
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


@dataclass
class DeviceWeight:
    """A weight on the device: its ggml tensor, plus the host bytes that back it (kept alive)."""

    tensor: Any                 # ggml_tensor_p
    host: np.ndarray            # GGUF-ordered data, the `in` dimension fastest
    ggml_type: int
    shape: tuple[int, ...]      # logical numpy shape: [out, in] or [E, out, in]
    name: str                   # the checkpoint tensor's name, for error messages


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


def free(backend: Any, threadpool: Any, allocator: Any, graph_ctx: Any, buffers: list[Any],
         contexts: list[Any]) -> None:
    """Free an engine's ggml objects (weights' host memory belongs to their numpy arrays)."""
    for buffer in buffers:
        ggml.ggml_backend_buffer_free(buffer)
    for ctx in contexts + [graph_ctx]:
        ggml.ggml_free(ctx)
    ggml.ggml_gallocr_free(allocator)
    ggml.ggml_backend_free(backend)
    if threadpool is not None:
        ggml.ggml_threadpool_free(threadpool)


class Engine:
    """One ggml device and a reusable context + allocator for one-op graphs."""

    def __init__(self, n_threads: int, device: str = "auto"):
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
        self.buffer_type = ggml.ggml_backend_get_default_buffer_type(self.backend)
        self.allocator = ggml.ggml_gallocr_new(self.buffer_type)
        size = ggml.ggml_tensor_overhead() * GRAPH_TENSORS + ggml.ggml_graph_overhead()
        self.graph_memory = ctypes.create_string_buffer(size)
        self.graph_ctx = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=size, mem_buffer=ctypes.cast(self.graph_memory, ctypes.c_void_p), no_alloc=True))
        self.weight_buffers: list[Any] = []
        self.weight_contexts: list[Any] = []
        weakref.finalize(self, free, self.backend, self.threadpool, self.allocator, self.graph_ctx,
                         self.weight_buffers, self.weight_contexts)

    # --- weights ------------------------------------------------------------------------------
    def weight(self, host: np.ndarray, ggml_type: int, shape: Sequence[int], name: str = "weight") -> DeviceWeight:
        """Place a weight whose bytes `host` hold `shape` (numpy order) in ggml type `ggml_type`."""
        if not 0 <= ggml_type < ggml.GGML_TYPE_COUNT or ggml.ggml_blck_size(ggml_type) == 0:
            raise ValueError(f"ggml type {ggml_type} is not one this ggml build knows")
        if shape[-1] % ggml.ggml_blck_size(ggml_type):
            raise ValueError(f"rows of {shape[-1]} values do not fill whole blocks of "
                             f"{ggml.ggml_type_name(ggml_type).decode()}")
        host = aligned(host)
        ne = list(reversed(shape))
        ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=ggml.ggml_tensor_overhead(),
                                                   mem_buffer=None, no_alloc=True))
        self.weight_contexts.append(ctx)
        tensor = ggml.ggml_new_tensor(ctx, ggml_type, len(ne), (ctypes.c_int64 * len(ne))(*ne))
        nbytes = ggml.ggml_nbytes(tensor)
        if nbytes != host.nbytes:
            raise ValueError(f"{nbytes} bytes expected for shape {list(shape)}, got {host.nbytes}")
        # (ggml-python 0.0.45 declares ggml_backend_cpu_buffer_from_ptr and ggml_backend_alloc_buffer
        # with a 32-bit result, truncating the pointer: use the device/buffer-type calls instead.)
        if self.wraps_host_memory:  # wrap the host bytes in place: no copy, stays memory-mapped
            buffer = ggml.ggml_backend_dev_buffer_from_host_ptr(self.ggml_device, host.ctypes.data,
                                                                nbytes, nbytes)
            ggml.ggml_backend_tensor_alloc(buffer, tensor, host.ctypes.data)
        else:                       # upload once to device memory
            buffer = ggml.ggml_backend_buft_alloc_buffer(self.buffer_type, nbytes)
            ggml.ggml_backend_tensor_alloc(buffer, tensor, ggml.ggml_backend_buffer_get_base(buffer))
            ggml.ggml_backend_tensor_set(tensor, host.ctypes.data, 0, nbytes)
        self.weight_buffers.append(buffer)
        return DeviceWeight(tensor, host, ggml_type, tuple(shape), name)

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
        if not ggml.ggml_gallocr_alloc_graph(self.allocator, graph):
            raise RuntimeError("ggml could not allocate the graph")
        for t, x in uploads:
            ggml.ggml_backend_tensor_set(t, x.ctypes.data, 0, x.nbytes)
        if self.is_cpu:
            ggml.ggml_backend_cpu_set_n_threads(self.backend, 1 if work < ONE_THREAD_WORK else self.n_threads)
        status = ggml.ggml_backend_graph_compute(self.backend, graph)
        if status != ggml.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        out = np.empty(tuple(out_shape), np.float32)
        if ggml.ggml_nbytes(result) != out.nbytes:
            raise ValueError(f"ggml result has {ggml.ggml_nbytes(result)} bytes, expected shape {list(out_shape)}")
        ggml.ggml_backend_tensor_get(result, out.ctypes.data, 0, out.nbytes)
        return out


def quantize(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 [..., n] -> ggml blocks uint8 [rows, row_bytes] through ggml's own quantizer."""
    n = w.shape[-1]
    src = np.ascontiguousarray(w, np.float32).reshape(-1, n)
    out = np.empty((src.shape[0], ggml.ggml_row_size(ggml_type, n)), np.uint8)
    ggml.ggml_quantize_chunk(ggml_type, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data,
                             0, src.shape[0], n, None)
    return out
