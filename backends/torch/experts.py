"""Mixture-of-experts products as one grouped GEMM over tokens sorted by expert.

A canvas step routes T tokens to k experts each: the T*k (token, slot) rows are sorted by expert id
(a stable device argsort, no host sync), multiplied group by group against the stacked weights
[E, out, in] in a single `torch._grouped_mm`, and scattered back to [T, k, out].  Where the grouped
kernel is missing (torch < 2.8, or float32 on CUDA) a loop over only the experts present does the
same products (one host read of the group sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class ExpertGroups:
    """(token, slot) rows of a routing decision, sorted by expert."""

    order: torch.Tensor           # [N] flat slot index (t * k + j) of each sorted row
    expert_of_row: torch.Tensor   # [N] expert id of each sorted row (ascending)
    offsets: torch.Tensor         # [E] int32 cumulative row counts: group e is rows offsets[e-1]..offsets[e]


def group_by_expert(ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    """ids [T, k] int -> the N = T*k slots sorted (stably) by expert."""
    flat = ids.reshape(-1)                                             # [T*k]
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    # group ends by binary search (torch.bincount would read its maximum back to the host on CUDA)
    experts = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)   # [E]
    return ExpertGroups(order, sorted_ids, offsets)


def gather_rows(x: torch.Tensor, groups: ExpertGroups, k: int) -> torch.Tensor:
    """The input row of each sorted slot: x [T, in] (shared by the k slots) or [T, k, in] -> [N, in]."""
    if x.dim() == 2:
        return x.index_select(0, groups.order // k)
    return x.reshape(-1, x.shape[-1]).index_select(0, groups.order)  # [T*k, in] -> [N, in]


def scatter_rows(y: torch.Tensor, groups: ExpertGroups, T: int, k: int) -> torch.Tensor:
    """Sorted results [N, out] back to slot order [T, k, out]."""
    out = torch.empty_like(y)
    out.index_copy_(0, groups.order, y)
    return out.reshape(T, k, y.shape[-1])


def grouped_kernel_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU for any float dtype (eagerly: its compile-time shape rules
    take bf16 only) and on CUDA (sm80+) for bf16."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.device.type == "cpu":
        return a.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return (a.device.type == "cuda" and a.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(a.device) >= (8, 0))


def grouped_mm(rows: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows [N, in] sorted by group, w [E, out, in], offsets [E] int32 -> [N, out] (rows @ w[e].T)."""
    wt = w.transpose(-2, -1)                                           # [E, in, out], column-major
    if grouped_kernel_usable(rows, wt):
        return torch._grouped_mm(rows, wt, offs=offsets)
    return loop_mm(rows, w, offsets, lambda e: w[e])


def loop_mm(rows: torch.Tensor, w: Any, offsets: torch.Tensor,
            expert: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The grouped product as a loop over the experts that have rows (one host read of the group
    sizes); expert(e) gives expert e's weight [out, in] in the rows' dtype."""
    out = rows.new_empty(rows.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = rows[start:end] @ expert(e).T
        start = end
    return out
