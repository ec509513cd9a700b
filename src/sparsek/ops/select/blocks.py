"""Per-query-block key lists for the fused kernels, built from the selection ranges in O(T log T).

Shape legend: R rows (batch x KV heads), T keys, NB = ceil(T / BLOCK) query blocks, K = min(topk, T) slots.

The top-k set of a row behaves like a cache of K slots: once K candidates exist, every key that enters the
top-k evicts exactly one key, at the query where it enters (start_j), and a key that leaves never returns. If
the entering key takes the slot of the key it evicts, every key sits in one slot for its whole selection range
[start_j, end_j), and slot s holds one key at any query. The list of block b is the slot array at its first
query i0 = b * BLOCK: every query of the block selects a subset of those keys plus keys that became
candidates inside the block, which lie in the window band the kernels visit anyway (SPEC section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import check_backend


def selection_slots(start: Tensor, end: Tensor, topk: int) -> Tensor:
    """The slot of every key: start, end [R, T] int64 -> [R, T] int64 in [0, K), -1 for keys never selected.

    The first K keys take slots 0..K-1; a later key inherits the slot of the key evicted at its start
    (the one whose end equals that start). Pointer jumping resolves those chains in log2(T) rounds.
    """
    rows, t_len = start.shape
    positions = torch.arange(t_len, device=start.device).expand(rows, t_len)
    ever_selected = end > start
    evicted_at = torch.full((rows, t_len + 1), -1, dtype=torch.int64, device=start.device)
    evictions = ever_selected & (end < t_len)
    evicted_at.scatter_(1, torch.where(evictions, end, t_len), torch.where(evictions, positions, -1))
    evicted_at[:, t_len] = -1
    parent = torch.where(ever_selected & (positions >= topk), evicted_at.gather(1, start.clamp(max=t_len)), positions)
    for _ in range(max(1, (t_len - 1).bit_length())):
        parent = parent.gather(1, parent.clamp(min=0))
    return torch.where(ever_selected, parent, -1)


def block_key_lists(start: Tensor, end: Tensor, topk: int, block: int, *, backend: str = "reference") -> Tensor:
    """Keys selected by the first query of each block, by slot.

    Args:
        start, end: [R, T] int64 selection ranges from `prefix_selection` (key j is selected by queries
            start_j <= i < end_j).
        topk: the selection budget; block: queries per block.
        backend: "reference" (this function, in PyTorch), or "auto": its twin in ops/select/native.c for CPU
            rows where that builds (see `prefix_selection`), else the reference.

    Returns:
        [R, NB, K] int32: entry (r, b, s) is the key in slot s at query b * block, or -1 for an empty slot.
        A key appears in the consecutive blocks b with start_j <= b * block < end_j.
    """
    check_backend(backend, ("auto", "reference"))
    rows, t_len = start.shape
    if backend == "auto" and start.device.type == "cpu" and topk and t_len:
        from . import native

        if native.available():
            return native.block_key_lists_native(start, end, topk, block)
    n_blocks = -(-t_len // block)
    n_slots = max(1, min(topk, t_len))
    lists = torch.full((rows, n_blocks, n_slots), -1, dtype=torch.int32, device=start.device)
    if topk == 0 or t_len == 0:
        return lists
    slot = selection_slots(start, end, topk)
    first_block = -(-start // block)                                       # first b with b * block >= start
    last_block = (end - 1).div(block, rounding_mode="floor")                # last b with b * block < end
    n_blocks_of_key = torch.where(slot >= 0, (last_block - first_block + 1).clamp(min=0), 0).flatten()
    total = int(n_blocks_of_key.sum())
    key = torch.repeat_interleave(torch.arange(rows * t_len, device=start.device), n_blocks_of_key,
                                  output_size=total)
    offset = torch.arange(total, device=start.device) - torch.repeat_interleave(
        torch.cumsum(n_blocks_of_key, 0) - n_blocks_of_key, n_blocks_of_key, output_size=total)
    row, pos = key // t_len, key % t_len
    lists[row, first_block.flatten()[key] + offset, slot.flatten()[key]] = pos.to(torch.int32)
    return lists
