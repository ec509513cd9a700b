"""Host side of the Triton selection: the same results as `prefix.select_rows` and `blocks.block_key_lists`,
in a few dozen launches instead of thousands of small PyTorch operations.

Shape legend: R rows, T keys per row, L = T - window candidate positions, M = 3R stacked wavelet rows.
Memory: every wavelet level is kept for the single descent kernel, nbits(2L) x (L + 1) x 28R bytes (int32
counts for the 3R rows, float64 weights for the 2R p and q rows: about 1.05 GB for 16 rows of 128k), freed on
return, unless the call is replayed as a CUDA graph (up to 2^19 scores, see ops/graphs.py), whose memory pool
keeps it; more rows are processed in groups within 2 GiB.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..common import interpreting, tiles
from . import kernels
from .prefix import SPREAD, best_first_order, key_ranges
from .wavelet import bits_needed


def _programs_wanted(device: torch.device) -> int:
    if interpreting():
        return 16          # several segments per row even on the tests' short rows
    return 4 * tiles.sm_count(device)


def _wavelet_levels(vals: Tensor, weights: Tensor, nbits: int) -> tuple[Tensor, Tensor]:
    """All levels of the wavelet matrices of vals [M, L] (int32), the first M_W rows weighted by weights
    [M_W, L] (float64; the other rows weigh nothing): zeros_before [nbits, M, L + 1] int32 and
    ones_weight_before [nbits, M_W, L + 1] float64."""
    rows, n = vals.shape
    weighted = weights.shape[0]
    chunk = tiles.selection(tiles.target(vals.device))["wavelet"]["CHUNK"]
    n_seg = max(1, min(triton.cdiv(n, chunk), triton.cdiv(_programs_wanted(vals.device), rows)))
    seg_len = triton.cdiv(triton.cdiv(n, n_seg), chunk) * chunk
    n_seg = triton.cdiv(n, seg_len)
    zeros_before = torch.empty(nbits, rows, n + 1, dtype=torch.int32, device=vals.device)
    ones_weight_before = torch.empty(nbits, weighted, n + 1, dtype=torch.float64, device=vals.device)

    def new_parts():  # per segment of a level, 4 parts: [next segment, zeros, weight of the ones]
        return (torch.empty(rows, 4 * n_seg, dtype=torch.int32, device=vals.device),
                torch.empty(rows, 4 * n_seg, dtype=torch.int32, device=vals.device),
                torch.empty(rows, 4 * n_seg, dtype=torch.float64, device=vals.device))

    parts, next_parts = new_parts(), new_parts()
    kernels.wavelet_count_kernel[(rows, n_seg)](vals, weights, *parts, n, weighted, seg_len, n_seg, nbits - 1,
                                                CHUNK=chunk)
    # The inputs are only read; the sequences of later levels alternate between two buffers.
    buffers = [(torch.empty_like(vals), torch.empty_like(weights)) for _ in range(2)]
    for level in range(nbits):
        cur_vals, cur_w = (vals, weights) if level == 0 else buffers[(level - 1) % 2]
        next_vals, next_w = buffers[level % 2]
        kernels.wavelet_write_kernel[(rows, n_seg)](
            cur_vals, cur_w, next_vals, next_w, zeros_before[level], ones_weight_before[level], *parts, *next_parts,
            n, weighted, seg_len, n_seg, nbits - 1 - level, CHUNK=chunk, PARTS_POW2=triton.next_power_of_2(4 * n_seg))
        parts, next_parts = next_parts, parts
    return zeros_before, ones_weight_before


# Scratch bytes per call, at most: rows are processed in groups that fit (the levels take 28 bytes per
# position, per level, per selection row).
MAX_SCRATCH_BYTES = 2 << 30


@torch.no_grad()
def select_rows_triton(u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of `prefix.select_rows`: u [R, T] -> tau [R, T] float64, start, end [R, T] int64."""
    rows, t_len = u.shape
    n = max(1, t_len - window)
    group = max(1, MAX_SCRATCH_BYTES // (bits_needed(2 * n) * (n + 1) * 28))
    if rows > group:
        parts = [_select_rows_group(u[r:r + group], topk, window) for r in range(0, rows, group)]
        return tuple(torch.cat(p) for p in zip(*parts))
    return _select_rows_group(u, topk, window)


def _select_rows_group(u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    rows, t_len = u.shape
    n = t_len - window                                                    # candidate positions
    if n <= 0 or topk == 0:
        start, end = key_ranges(u, topk, window)
        return torch.full((rows, t_len), -torch.inf, dtype=torch.float64, device=u.device), start, end
    uc = u[:, :n].double().contiguous()
    by_rank, breaks, vals, weights, shift = _rank_sequences(u[:, :n], uc)
    nbits = bits_needed(2 * n)
    zeros_before, ones_weight_before = _wavelet_levels(vals, weights, nbits)

    tau = torch.empty(rows, n, dtype=torch.float64, device=u.device)
    kth = torch.empty(rows, n, dtype=torch.int32, device=u.device)
    kth_next = torch.empty_like(kth)
    chunks = tiles.selection(tiles.target(u.device))
    block = chunks["descend"]["BLOCK"]
    kernels.prefix_descend_kernel[(rows, triton.cdiv(n, block))](
        zeros_before, ones_weight_before, breaks, tau, kth, kth_next, rows, n, 2 * n, nbits,
        zeros_before.stride(0), ones_weight_before.stride(0), topk, BLOCK=block)
    tau += shift                                                          # the descent ran relative to it

    # Finish as prefix.py does (the flat case takes the midpoint, short prefixes have no threshold), then the
    # running maximum, written to the queries past the window.
    chunk = chunks["finish"]["CHUNK"]
    n_chunks = triton.cdiv(n, chunk)
    chunk_max = torch.empty(rows, n_chunks, dtype=torch.float64, device=u.device)
    kernels.finish_tau_kernel[(rows, n_chunks)](uc, by_rank, kth, kth_next, tau, chunk_max, n, n_chunks, topk,
                                                CHUNK=chunk)
    tau_query = torch.full((rows, t_len), -torch.inf, dtype=torch.float64, device=u.device)
    kernels.running_max_kernel[(rows, n_chunks)](tau, chunk_max, tau_query[:, window:], n, n_chunks, t_len,
                                                 CHUNK=chunk, CHUNKS_POW2=triton.next_power_of_2(n_chunks))
    start = torch.empty(rows, t_len, dtype=torch.int64, device=u.device)
    end = torch.empty_like(start)
    kernels.key_ranges_kernel[(rows, triton.cdiv(t_len, chunk))](kth, vals[2 * rows:], start, end, n, t_len, window,
                                                                 topk, n.bit_length(), CHUNK=chunk)
    return tau_query, start, end


def _rank_sequences(u: Tensor, uc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One sort of the scores u [R, L] (uc: the same in float64) -> the best-first order by_rank [R, L] int64
    (prefix.best_first_order), the breakpoints in order [R, 2L] float64, the wavelet rows [3R, L] int32 (ranks
    of u_j and u_j - 1 among the breakpoints, best-first ranks), their weights [2R, L] float64 (see
    breakpoint_ranks_kernel and keys_by_rank_kernel) and each row's median [R, 1] float64. As in
    prefix._prefix_thresholds, the breakpoints are taken relative to that median (a common offset such as
    1e12 would cancel the differences that decide tau) and the weights clamped to +-SPREAD from it (one far
    score, 1e30 among values near 0, would swamp the sums). The sort runs in the scores' own dtype: each float
    converts exactly and in order to float64, so the order is the same for every non-NaN score (NaN scores
    make the attention's output NaN anyway), and a radix sort of float32 keys takes half the passes of float64
    (16 rows on an H100: selection + lists 0.51 -> 0.47 ms at T = 16k, 3.02 -> 2.84 ms at 128k)."""
    rows, n = uc.shape
    desc, by_rank = best_first_order(u)
    lower_median = n - 1 - (n - 1) // 2                                  # torch.median's, counted best first
    shift = desc[:, lower_median:lower_median + 1].double()
    desc = desc.double() - shift
    breaks = torch.empty(rows, 2 * n, dtype=torch.float64, device=uc.device)
    vals = torch.empty(3 * rows, n, dtype=torch.int32, device=uc.device)
    weights = torch.empty(2 * rows, n, dtype=torch.float64, device=uc.device)
    sorted_ranks = torch.empty(rows, 2, n, dtype=torch.int32, device=uc.device)
    chunk = tiles.selection(tiles.target(uc.device))["ranks"]["CHUNK"]
    grid = (rows, triton.cdiv(n, chunk))
    kernels.breakpoint_ranks_kernel[grid](desc, by_rank, breaks, sorted_ranks, vals, rows, n, n.bit_length(),
                                          CHUNK=chunk)
    clamped = (uc - shift).clamp(-SPREAD, SPREAD)
    kernels.keys_by_rank_kernel[grid](clamped, sorted_ranks, vals, weights, rows, n, CHUNK=chunk)
    return by_rank, breaks, vals, weights, shift


# Links followed per launch of the pointer jumping: 8^6 >= 128k takes 6 launches instead of 17 gathers.
JUMP_STEPS = 8


def _selection_slots(start: Tensor, end: Tensor, topk: int) -> Tensor:
    """blocks.selection_slots in Triton: start, end [R, T] int32 -> [R, T] int32 (-1 for keys never selected),
    the parents in two launches and the pointer jumping in JUMP_STEPS links per launch."""
    rows, t_len = start.shape
    chunk = tiles.selection(tiles.target(start.device))["slots"]["CHUNK"]
    grid = (rows, triton.cdiv(t_len, chunk))
    evicted_at = torch.full((rows, t_len), -1, dtype=torch.int32, device=start.device)
    kernels.evictions_kernel[grid](start, end, evicted_at, t_len, CHUNK=chunk)
    parent, jumped = torch.empty_like(evicted_at), torch.empty_like(evicted_at)
    kernels.slot_parents_kernel[grid](start, end, evicted_at, parent, t_len, topk, CHUNK=chunk)
    reach = 1
    while reach < t_len:       # after r launches each key has followed JUMP_STEPS^r links (or reached its root)
        kernels.follow_parents_kernel[grid](parent, jumped, t_len, STEPS=JUMP_STEPS, CHUNK=chunk)
        parent, jumped = jumped, parent
        reach *= JUMP_STEPS
    return torch.where(end > start, parent, -1)


def block_key_lists_triton(start: Tensor, end: Tensor, topk: int, block: int) -> Tensor:
    """Triton twin of `blocks.block_key_lists`: start, end [R, T] from the selection (start_j = j + window, so a
    slot's later occupants are newer keys, which fill_lists_kernel relies on) -> [R, NB, K] int32."""
    rows, t_len = start.shape
    n_blocks = triton.cdiv(t_len, block)
    n_slots = max(1, min(topk, t_len))
    lists = torch.full((rows, n_blocks, n_slots), -1, dtype=torch.int32, device=start.device)
    if topk == 0 or t_len == 0:
        return lists
    start, end = start.int().contiguous(), end.int().contiguous()
    slot = _selection_slots(start, end, topk)
    chunks = tiles.selection(tiles.target(start.device))["lists"]
    kernels.slot_entries_kernel[(rows, triton.cdiv(t_len, chunks["CHUNK"]))](
        slot, start, end, lists, t_len, n_blocks, n_slots, BLOCK=block, CHUNK=chunks["CHUNK"])
    kernels.fill_lists_kernel[(rows, triton.cdiv(n_slots, chunks["SLOT_TILE"]))](
        lists, n_blocks, n_slots, BLOCK_CHUNK=chunks["BLOCK_CHUNK"], SLOT_TILE=chunks["SLOT_TILE"])
    return lists


@torch.no_grad()
def threshold_backward_triton(u: Tensor, tau: Tensor, window: int, grad_tau: Tensor, du: Tensor) -> Tensor:
    """Triton twin of `prefix.threshold_backward`, added to du in place: u, tau, du [R, T] float32 (tau
    non-decreasing along each row, as the selection returns it), grad_tau [R * G, T] float32 for G >= 1 query
    heads per row (summed) -> du. A memset and four kernels; scratch 28 bytes per score."""
    rows, t_len = u.shape
    if rows == 0 or t_len == 0:
        return du
    if grad_tau.shape[0] % rows:
        raise ValueError(f"grad_tau must have a multiple of {rows} rows, got {grad_tau.shape[0]}")
    group = grad_tau.shape[0] // rows
    chunks = tiles.selection(tiles.target(u.device))["threshold_backward"]
    chunk, scan = chunks["CHUNK"], chunks["SCAN"]
    n_scan = triton.cdiv(t_len, scan)
    counts = torch.zeros(rows * (t_len + 1 + n_scan + 1), dtype=torch.int32, device=u.device)  # one memset
    cover = counts[: rows * (t_len + 1)].view(rows, t_len + 1)
    chunk_cover = counts[rows * (t_len + 1):].view(rows, n_scan + 1)
    lo = torch.empty(rows, t_len, dtype=torch.int32, device=u.device)
    hi = torch.empty_like(lo)
    grid = (rows, triton.cdiv(t_len, chunk))
    kernels.fractional_ranges_kernel[grid](u, tau, lo, hi, cover, chunk_cover, t_len, window, n_scan,
                                           t_len.bit_length(), SCAN=scan, CHUNK=chunk)
    share = torch.empty(rows, t_len, dtype=torch.float64, device=u.device)
    chunk_share = torch.empty(rows, n_scan, dtype=torch.float64, device=u.device)
    scans_pow2 = triton.next_power_of_2(n_scan)
    kernels.fractional_shares_kernel[(rows, n_scan)](cover, chunk_cover, grad_tau, share, chunk_share, t_len,
                                                     n_scan, group, SCAN=scan, SCANS_POW2=scans_pow2)
    share_before = torch.empty(rows, t_len + 1, dtype=torch.float64, device=u.device)
    kernels.share_prefix_kernel[(rows, n_scan)](share, chunk_share, share_before, t_len, n_scan, SCAN=scan,
                                                SCANS_POW2=scans_pow2)
    kernels.add_threshold_grad_kernel[grid](share_before, lo, hi, du, t_len, CHUNK=chunk)
    return du


class TritonThresholds(torch.autograd.Function):
    """select_rows_triton with the thresholds' gradient (threshold_backward_triton): u [R, T] float32 ->
    tau [R, T] float32 (differentiable), start, end [R, T] int64. The backend "triton" of `prefix_selection`."""

    @staticmethod
    def forward(ctx, u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
        tau, start, end = select_rows_triton(u, topk, window)
        tau = tau.float()
        ctx.save_for_backward(u, tau)
        ctx.window = window
        ctx.mark_non_differentiable(start, end)
        return tau, start, end

    @staticmethod
    def backward(ctx, grad_tau: Tensor, *_):
        u, tau = ctx.saved_tensors
        du = threshold_backward_triton(u, tau, ctx.window, grad_tau.float().contiguous(), torch.zeros_like(u))
        return du, None, None
