"""The SparseK attention forward and the backward's dq pass in Gluon, Triton 3.6's lower-level dialect, for
sm_90 (issue 22).

Status (2026-12-05, H100): every config, the warp-specialised one and head dim 256 equal the `tl` forward in
tests/ops/test_attention_gluon.py, and the attention GPU tests pass with backend "gluon". Against the `tl`
forward (topk 1024 + window 512): 1.12-1.18x at head dim 128 (8k-128k) and 1.15x at 64 (32k) with 64-key
tiles, 3 stages and a 4-warp producer partition; 3.5x at 256 (32k; 32-key tiles, 2 stages), where the `tl`
forward reaches 74 TF/s.
"auto" takes it on sm_90 (`fused.GLUON_BY_DEFAULT`).
`fused_forward_gluon` has the signature of `fused.fused_forward`, so the tests compare the two directly.
The dq pass (`dq_pass_gluon`, 2026-12-06, H100) equals the `tl` one (`fused.dq_pass`) in the same tests and
runs 1.27-1.32x faster; the backward takes it with the Gluon forward (`fused.GLUON_DQ`).
The list pass (`list_pass_gluon`) is a first version, off (`fused.GLUON_LIST`): on an H100 it equalled the `tl`
list pass in 6 of 8 test cases; the other two did not compile before GROUP was kept from being specialised,
and that change, like its speed, has not run on a GPU.

Same contract as `kernels.sparsek_fwd_kernel` (see that module's docstring): query block [i0, i0 + BLOCK_M) of
one query head attends its list (the keys selected at i0) and then its band (i0 - w, i0 + BLOCK_M), with the
mask m_ij = clip(u_j - tau_i, 0, 1) (1 in the window), an online softmax in base 2, o and lse (log2 units).
How it differs: list and band are one sequence of key tiles (64 keys by default). Each tile's K and V rows
and its keys' u, start and end stream into a ring of shared-memory stages by cp.async (gathered by key for the
list); both products are Hopper wgmma, asynchronous, with the softmax of tile t running while P V of tile
t - 1 is on the tensor cores. Band tiles inside every query's window skip the mask.

Triton 3.9 renamed the copy (`async_copy_global_to_shared` became `async_load`), so this file compiles only
with Triton 3.6 (`gluon_api_supported`).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..common import GATE_IDS, LOG2E, interpreting, tiles
from .fused import empty_output, grouped_strides, list_pass_chunks, on_sm90

PRODUCER_REGISTERS = gl.constexpr(48)  # per producer thread (addresses and copies): 40 spills at 64-key tiles
SM90_SHARED_BYTES = 232448   # the most shared memory one program may opt into on sm_90 (227 KiB)


def gluon_api_supported() -> bool:
    """True when the installed Triton is 3.6, whose Gluon API this file is written for. Gluon is experimental
    and changes between releases: 3.9 keeps `async_copy_global_to_shared` only to raise that it was removed."""
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


@gluon.jit
def _copy_rows(dst, base, rows, row_ok, stride, HEAD_DIM: gl.constexpr, ld: gl.constexpr):
    """dst [rows, D] <- base[rows * stride + d] by cp.async; rows of row_ok False are zero-filled."""
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    rows = gl.where(row_ok, rows, 0).to(gl.int64)            # an empty slot (-1) points at row 0, unread
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    async_copy.async_copy_global_to_shared(dst, ptrs, mask=row_ok[:, None])


@gluon.jit
def _tile_keys(t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, BLOCK_N: gl.constexpr, layout: gl.constexpr):
    """The keys of tile t [BLOCK_N] int32 in `layout`, -1 where there is none: tiles [0, n_list_tiles) hold
    list slots (an empty slot is -1), the later ones consecutive band keys from band_lo up to band_hi."""
    r = gl.arange(0, BLOCK_N, layout=layout)
    slots = t * BLOCK_N + r
    listed = gl.load(list_base + slots, mask=(slots < N_SLOTS) & (t < n_list_tiles), other=-1)
    band = band_lo + (t - n_list_tiles) * BLOCK_N + r
    return gl.where((band >= band_lo) & (band < band_hi), band, listed)   # band < band_lo on list tiles


@gluon.jit
def _fill_stage(ring, stage, t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src, stride_kt, stride_vt,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, ld: gl.constexpr, meta: gl.constexpr):
    """Start the cp.async copies of tile t into ring stage `stage`: its K and V rows and its keys' u, start and
    end. Missing rows are zero-filled without a read (end 0: no query selects them), so a tile past the last
    one costs no memory traffic. Returns the tile's keys in `meta`.
    ring = (K, V, keys, u, start, end) buffers [STAGES, ...]; src = their sources (K, V, u, start, end rows)."""
    k_ring, v_ring, keys_ring, u_ring, start_ring, end_ring = ring
    k_base, v_base, u_row, start_row, end_row = src
    keys = _tile_keys(t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, BLOCK_N, gl.SliceLayout(1, ld))
    _copy_rows(k_ring.index(stage), k_base, keys, keys >= 0, stride_kt, HEAD_DIM, ld)
    _copy_rows(v_ring.index(stage), v_base, keys, keys >= 0, stride_vt, HEAD_DIM, ld)
    keys = _tile_keys(t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, BLOCK_N, meta)
    ok = keys >= 0
    rows = gl.where(ok, keys, 0)
    async_copy.async_copy_global_to_shared(u_ring.index(stage), u_row + rows, mask=ok)
    async_copy.async_copy_global_to_shared(start_ring.index(stage), start_row + rows, mask=ok)
    async_copy.async_copy_global_to_shared(end_ring.index(stage), end_row + rows, mask=ok)
    return keys


@gluon.jit
def _issue_tile(ring, stage, t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src, stride_kt, stride_vt,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, ld: gl.constexpr, meta: gl.constexpr):
    """`_fill_stage`, plus the keys by a plain store, as one commit group."""
    keys = _fill_stage(ring, stage, t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src, stride_kt,
                       stride_vt, BLOCK_N, HEAD_DIM, ld, meta)
    ring[2].index(stage).store(keys)
    async_copy.commit_group()


@gluon.jit
def _inside_every_window(t, n_list_tiles, band_lo, r0, WINDOW, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """True when tile t is a band tile whose every key lies in the window of every query of the program: then
    each pair is allowed with weight 1, and the tile needs no mask (the `tl` kernel's unmasked band tiles)."""
    j0 = band_lo + (t - n_list_tiles) * BLOCK_N
    return (t >= n_list_tiles) & (j0 + BLOCK_N - 1 <= r0) & (j0 > r0 + BLOCK_M - 1 - WINDOW)


@gluon.jit
def _tile_weight(s, ring, stage, is_list, inside, offs_m, tau, WINDOW, band_keys=None):
    """The mask of one tile's scores s [BLOCK_M, BLOCK_N] (float32, s's layout), with the tile's u, start and
    end read from its ring stage, and its keys too unless `band_keys` gives them (band_lo + the tile's offset,
    up to band_hi: only band tiles take the full mask).

    Key j is allowed for query i when it is in i's window (weight 1) or i selects it, start_j <= i < end_j
    (weight clip(u_j - tau_i, 0, 1)). A listed key lies before the block's first window and was selected by
    the block's first query, so on list tiles the rule reduces to i < end_j; inside every window it is 1.
    The branches yield one float32 tile, the weight, with -1 for a pair that is not allowed: a boolean tile
    yielded from a branch costs packed predicates, and -1 can never be a weight."""
    _, _, keys_ring, u_ring, start_ring, end_ring = ring
    cols: gl.constexpr = gl.SliceLayout(0, s.type.layout)
    i = gl.expand_dims(offs_m, 1)
    if is_list:                                            # a missing key has end_j = 0
        gap = gl.expand_dims(u_ring.index(stage).load(cols), 0) - gl.expand_dims(tau, 1)
        end_j = gl.expand_dims(end_ring.index(stage).load(cols), 0)
        weight = gl.where(i < end_j, gl.minimum(gl.maximum(gap, 0.0), 1.0), -1.0)
    elif inside:
        weight = gl.full(s.shape, 1.0, gl.float32, layout=s.type.layout)
    else:
        if band_keys is None:
            j = gl.expand_dims(keys_ring.index(stage).load(cols), 0)
        else:
            first, band_hi = band_keys
            j = first + gl.arange(0, s.shape[1], layout=cols)
            j = gl.expand_dims(gl.where(j < band_hi, j, -1), 0)
        gap = gl.expand_dims(u_ring.index(stage).load(cols), 0) - gl.expand_dims(tau, 1)
        start_j = gl.expand_dims(start_ring.index(stage).load(cols), 0)
        end_j = gl.expand_dims(end_ring.index(stage).load(cols), 0)
        behind = i - j
        in_window = (behind >= 0) & (behind < WINDOW) & (j >= 0)
        selected = (start_j <= i) & (i < end_j)
        weight = gl.where(in_window, 1.0, gl.where(selected, gl.minimum(gl.maximum(gap, 0.0), 1.0), -1.0))
    return weight


@gluon.jit
def _softmax_tile(s, ring, stage, is_list, inside, m_i, l_i, offs_m, tau, WINDOW, qk_scale2, GATE: gl.constexpr,
                  band_keys=None):
    """Mask, gate and online-softmax step of one tile's scores s [BLOCK_M, BLOCK_N] -> (p, alpha, m, l)."""
    weight = _tile_weight(s, ring, stage, is_list, inside, offs_m, tau, WINDOW, band_keys)
    if GATE == 0:
        s = s * (weight * qk_scale2)
    else:
        s = s * qk_scale2
    s = gl.where(weight >= 0.0, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    if GATE != 2:
        p = p * weight                                     # p = 0 where weight = -1
    return p, alpha, m_new, l_i


@gluon.jit
def _wait_for_tile(ready, t, STAGES: gl.constexpr, PRODUCER: gl.constexpr):
    """Until tile t is in its ring stage and visible to the wgmma: the producer's `ready` mbarrier (PRODUCER),
    or this thread's cp.async groups (tile t's group done once at most STAGES - 2 later ones are pending)."""
    if PRODUCER:
        mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
        fence_async_shared()
    else:
        async_copy.wait_group(STAGES - 2)
        _tile_landed()


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr):
    """The ring's `ready` (one cp.async arrive per producer thread) and `empty` (one arrive by the consumers)
    mbarriers, one per stage, initialised."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=PRODUCER_WARPS * 32)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()
    return ready, empty


@gluon.jit
def _tile_landed():
    """After this thread's `wait_group`: every thread's copies have landed and are visible to the wgmma
    (async proxy)."""
    gl.thread_barrier()
    fence_async_shared()


@gluon.jit
def _setup(Q, K, V, U, START, END, LISTS, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb,
           stride_vh, T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, LIST_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    """This program's rows and tiles: Q's rows in shared memory (copies started, one commit group), the ring,
    the sources of its tiles and how many there are (the filled list slots, then the band)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1], [1, 0])
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    meta_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H_Q
    hq = pid_bh % H_Q
    hk = hq // GROUP
    row = b * (H_Q // GROUP) + hk
    SPLIT: gl.constexpr = LIST_BLOCK // BLOCK_M          # programs per list block
    block = pid_m // SPLIT
    i0 = block * LIST_BLOCK                               # the block's first query, whose list this is
    r0 = i0 + (pid_m % SPLIT) * BLOCK_M                  # this program's first query

    offs_q = r0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    q_base = Q + b.to(gl.int64) * stride_qb + hq * stride_qh
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], gl.NVMMASharedLayout.get_default_for(
        [BLOCK_M, HEAD_DIM], dtype))
    _copy_rows(q_smem, q_base, offs_q, offs_q < T, stride_qt, HEAD_DIM, ld)
    async_copy.commit_group()
    ring = (gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl),
            gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl),
            gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], meta_sl),
            gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], meta_sl),
            gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], meta_sl),
            gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], meta_sl))
    src = (K + b.to(gl.int64) * stride_kb + hk * stride_kh, V + b.to(gl.int64) * stride_vb + hk * stride_vh,
           U + row.to(gl.int64) * T, START + row.to(gl.int64) * T, END + row.to(gl.int64) * T)
    list_base = LISTS + (row.to(gl.int64) * N_BLOCKS + block) * N_SLOTS
    n_listed = gl.minimum(N_SLOTS, gl.maximum(i0 - WINDOW + 1, 0))
    n_list_tiles = gl.cdiv(n_listed, BLOCK_N)
    band_lo = gl.maximum(i0 - WINDOW + 1, 0)
    band_hi = gl.minimum(r0 + BLOCK_M, T)
    n_tiles = n_list_tiles + gl.cdiv(band_hi - band_lo, BLOCK_N)
    return b, hq, row, r0, q_smem, ring, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles


@gluon.jit
def _attend_tiles(q_smem, ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, b, hq, row,
                  r0, pid_bh, TAU, OUT, LSE, POISON, stride_kt, stride_vt, stride_ob, stride_ot, stride_oh, T,
                  N_SLOTS, WINDOW, qk_scale2, GATE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, PRODUCER: gl.constexpr):
    """Rows [r0, r0 + BLOCK_M) over their tiles, then o and lse. Without PRODUCER these warps also fill the
    ring (cp.async commit groups, STAGES - 1 tiles ahead); with it a producer partition does, and the ring's
    stages pass between the two through the `ready` and `empty` mbarriers.

    Each step issues Q K^T of tile t and P V of tile t - 1 as asynchronous wgmma, waits for the first only,
    and runs tile t's softmax while the second is still on the tensor cores (FlashAttention-3's
    intra-warpgroup overlap)."""
    k_ring, v_ring = ring[0], ring[1]
    dtype: gl.constexpr = k_ring.dtype
    # Register layouts: S [BLOCK_M, BLOCK_N] and O [BLOCK_M, D] as wgmma accumulators, P as wgmma's A operand
    # from registers, and blocked layouts whose threads each move 16 bytes (or one key's value) for the copies.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1], [1, 0])
    meta: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)     # one value per query of S
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)     # one value per query of O

    if not PRODUCER:
        for p in gl.static_range(STAGES - 1):       # Q's copy group counts as part of tile 0's wait
            _issue_tile(ring, p, p, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src, stride_kt, stride_vt,
                        BLOCK_N, HEAD_DIM, ld, meta)

    offs_m = r0 + gl.arange(0, BLOCK_M, layout=rows_s)
    tau = gl.load(TAU + row.to(gl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=rows_s)  # finite: a fully masked tile gives no NaN
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    qk_scale2 = qk_scale2.to(gl.float32)
    band_keys = None
    if PRODUCER:                                       # the producer stores no keys: band keys are counted here
        band_keys = (band_lo - n_list_tiles * BLOCK_N, band_hi)

    # Tile 0 alone: its scores and P (there is no earlier P V to overlap), then the copy of tile STAGES - 1.
    _wait_for_tile(ready, 0, STAGES, PRODUCER)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(s, q_smem, k_ring.index(0)))
    inside = _inside_every_window(0, n_list_tiles, band_lo, r0, WINDOW, BLOCK_M, BLOCK_N)
    p, alpha, m_i, l_i = _softmax_tile(s, ring, 0, 0 < n_list_tiles, inside, m_i, l_i, offs_m, tau, WINDOW,
                                       qk_scale2, GATE, band_keys)
    p16 = gl.convert_layout(p.to(dtype), p_layout)
    if not PRODUCER:
        _issue_tile(ring, STAGES - 1, STAGES - 1, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src,
                    stride_kt, stride_vt, BLOCK_N, HEAD_DIM, ld, meta)

    for t in range(1, n_tiles):
        stage = t % STAGES
        prev = (t - 1) % STAGES
        _wait_for_tile(ready, t, STAGES, PRODUCER)
        k_t = k_ring.index(stage)
        v_prev = v_ring.index(prev)
        s = warpgroup_mma(q_smem, k_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p16, v_prev, acc, is_async=True)
        s, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(s, q_smem, k_t))  # P V of tile t - 1 runs on
        inside = _inside_every_window(t, n_list_tiles, band_lo, r0, WINDOW, BLOCK_M, BLOCK_N)
        if PRODUCER:
            band_keys = (band_lo + (t - n_list_tiles) * BLOCK_N, band_hi)
        p, alpha, m_i, l_i = _softmax_tile(s, ring, stage, t < n_list_tiles, inside, m_i, l_i, offs_m, tau, WINDOW,
                                           qk_scale2, GATE, band_keys)
        acc, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16, v_prev))
        if PRODUCER:
            gl.thread_barrier()                        # every attending warp is done with stage `prev`
            mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        if not PRODUCER:
            gl.thread_barrier()                        # no warp still reads stage `prev`: refill it
            _issue_tile(ring, prev, t + STAGES - 1, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src,
                        stride_kt, stride_vt, BLOCK_N, HEAD_DIM, ld, meta)

    v_last = v_ring.index(gl.maximum(n_tiles - 1, 0) % STAGES)
    acc = warpgroup_mma(p16, v_last, acc, is_async=True)
    acc, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16, v_last))
    if not PRODUCER:
        async_copy.wait_group(0)                       # no copy may outlive the kernel's shared memory

    l_safe = gl.where(l_i > 0, l_i, 1.0)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, rows_o), 1) + gl.load(POISON)
    offs_mo = r0 + gl.arange(0, BLOCK_M, layout=rows_o)
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    out_ptrs = (OUT + b.to(gl.int64) * stride_ob + hq * stride_oh + gl.expand_dims(offs_mo.to(gl.int64), 1) * stride_ot
                + gl.expand_dims(offs_do, 0))
    gl.store(out_ptrs, o.to(dtype), mask=gl.expand_dims(offs_mo < T, 1))
    gl.store(LSE + pid_bh.to(gl.int64) * T + offs_m, m_i + gl.log2(l_safe), mask=offs_m < T)


@gluon.jit
def _produce(ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, stride_kt, stride_vt,
             N_SLOTS, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr):
    """The producer partition: fills the ring tile by tile, each stage once the consumers have released it."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [WARPS, 1], [1, 0])
    meta: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    for t in range(gl.maximum(n_tiles, 1)):
        stage = t % STAGES
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)     # passes at once on the first round
        _fill_stage(ring, stage, t, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src, stride_kt, stride_vt,
                    BLOCK_N, HEAD_DIM, ld, meta)
        async_copy.mbarrier_arrive(ready.index(stage), increment_count=False)  # when this thread's copies land


@gluon.jit
def sparsek_fwd_gluon_kernel(
    Q, K, V, U, TAU, START, END, LISTS, OUT, LSE, POISON,
    q_strides, k_strides, v_strides, o_strides,
    T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, qk_scale2,
    GATE: gl.constexpr, LIST_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
):
    """Rows [r0, r0 + BLOCK_M) of query block i0 (the lists' LIST_BLOCK queries; BLOCK_M divides it) of head
    pid_bh over their tiles: first the list (the keys selected at i0), then the band (i0 - w, r0 + BLOCK_M), as
    one sequence of BLOCK_N-key tiles, which stream through a ring of STAGES shared-memory stages: K and V rows
    and their keys' u, start and end, copied by cp.async.

    PRODUCER_WARPS = 0: the NUM_WARPS warps also fill the ring, STAGES - 1 tiles ahead. Otherwise a partition
    of PRODUCER_WARPS warps fills it (`gl.warp_specialize`), and the NUM_WARPS warps only attend."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    b, hq, row, r0, q_smem, ring, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles = _setup(
        Q, K, V, U, START, END, LISTS, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, LIST_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS)
    pid_bh = gl.program_id(1)
    if PRODUCER_WARPS == 0:
        _attend_tiles(q_smem, ring, None, None, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, b, hq,
                      row, r0, pid_bh, TAU, OUT, LSE, POISON, stride_kt, stride_vt, stride_ob, stride_ot, stride_oh,
                      T, N_SLOTS, WINDOW, qk_scale2, GATE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, False)
    else:
        async_copy.wait_group(0)                       # Q, before the warps part ways
        gl.thread_barrier()
        ready, empty = _ring_barriers(STAGES, PRODUCER_WARPS)
        gl.warp_specialize([
            (_attend_tiles, (q_smem, ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles,
                             b, hq, row, r0, pid_bh, TAU, OUT, LSE, POISON, stride_kt, stride_vt, stride_ob,
                             stride_ot, stride_oh, T, N_SLOTS, WINDOW, qk_scale2, GATE, BLOCK_M, BLOCK_N, HEAD_DIM,
                             STAGES, NUM_WARPS, True)),
            (_produce, (ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, stride_kt,
                        stride_vt, N_SLOTS, BLOCK_N, HEAD_DIM, STAGES, PRODUCER_WARPS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGISTERS])


@gluon.jit
def _softmax_grad(s, dp, weight, lse2, delta, scale, qk_scale2, GATE: gl.constexpr):
    """The recomputed softmax of one tile and its gradients, as `kernels._bwd_tile`: from the scores s = Q K^T,
    dp = dO V^T and the mask weight (-1: not allowed), all float32 of one shape in either orientation (queries
    or keys as rows), with lse2 and delta broadcast to it -> (p m, the factor of dV; dS, of dQ and dK; dm, the
    gradient of the mask, unused for gate "none")."""
    if GATE == 0:
        p = gl.exp2(s * (weight * qk_scale2) - lse2)
    else:
        p = gl.exp2(s * qk_scale2 - lse2)
    p = gl.where(weight >= 0.0, p, 0.0)                   # where, not a product: exp2 may overflow off the mask
    if GATE == 2:                                          # a hard selection: no mask factors, no dm
        pw = p
        ds = p * (dp - delta) * scale
        dm = p
    else:
        dlogit = p * (weight * dp - delta)
        pw = p * weight
        if GATE == 0:
            ds = dlogit * (weight * scale)
            dm = p * dp + dlogit * scale * s
        else:
            ds = dlogit * scale
            dm = p * dp
    return pw, ds, dm


@gluon.jit
def _dq_tile(s, dp, ring, stage, is_list, inside, offs_m, tau, lse2, delta, WINDOW, scale, qk_scale2,
             GATE: gl.constexpr, band_keys=None):
    """One tile of the dq pass, from its scores s = Q K^T and dp = dO V^T [BLOCK_M, BLOCK_N] (float32): dS, the
    factor of dq = dS K, and the tile's share of dtau [BLOCK_M] (-sum of dm over its fractional keys). A
    fractional key is one whose weight lies strictly between 0 and 1: only a selected key can be one (a key in
    the window weighs 1)."""
    weight = _tile_weight(s, ring, stage, is_list, inside, offs_m, tau, WINDOW, band_keys)
    _, ds, dm = _softmax_grad(s, dp, weight, gl.expand_dims(lse2, 1), gl.expand_dims(delta, 1), scale, qk_scale2,
                              GATE)
    if GATE == 2:
        dtau = gl.zeros_like(tau)
    else:
        dtau = -gl.sum(gl.where((weight > 0.0) & (weight < 1.0), dm, 0.0), 1)
    return ds, dtau


@gluon.jit
def _dq_tiles(q_smem, do_smem, ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, b, hq,
              row, r0, pid_bh, TAU, OUT, DO, LSE, DELTA, DQ, DTAU, stride_kt, stride_vt, stride_ob, stride_ot,
              stride_oh, T, N_SLOTS, WINDOW, scale, GATE: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr,
              PRODUCER: gl.constexpr):
    """dq, dtau and delta of rows [r0, r0 + BLOCK_M) over the forward's tiles, fed by the same ring as
    `_attend_tiles` (PRODUCER: see there).

    Each step issues Q K^T and dO V^T of tile t and dS K of tile t - 1 as asynchronous wgmma, waits for the
    first two only, and computes tile t's dS while tile t - 1's product with K is still on the tensor cores."""
    k_ring, v_ring = ring[0], ring[1]
    dtype: gl.constexpr = k_ring.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1], [1, 0])
    meta: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    # delta = rowsum(dO * O), which the other two passes read, and dO into shared memory for dO V^T.
    offs_ml = r0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    offs_dl = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    rows_ok = gl.expand_dims(offs_ml < T, 1)
    row_offs = (b.to(gl.int64) * stride_ob + hq * stride_oh + gl.expand_dims(offs_ml.to(gl.int64), 1) * stride_ot
                + gl.expand_dims(offs_dl, 0))
    do = gl.load(DO + row_offs, mask=rows_ok, other=0.0)
    delta = gl.sum(do.to(gl.float32) * gl.load(OUT + row_offs, mask=rows_ok, other=0.0).to(gl.float32), 1)
    gl.store(DELTA + pid_bh.to(gl.int64) * T + offs_ml, delta, mask=offs_ml < T)
    do_smem.store(do)
    fence_async_shared()
    gl.thread_barrier()                                # every warp's dO rows are in place for the wgmma

    if not PRODUCER:
        for p in gl.static_range(STAGES - 1):
            _issue_tile(ring, p, p, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src, stride_kt, stride_vt,
                        BLOCK_N, HEAD_DIM, ld, meta)

    offs_m = r0 + gl.arange(0, BLOCK_M, layout=rows_s)
    tau = gl.load(TAU + row.to(gl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    lse2 = gl.load(LSE + pid_bh.to(gl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = gl.convert_layout(delta, rows_s)
    qk_scale2 = (scale * 1.4426950408889634).to(gl.float32)   # log2(e): the forward's softmax runs in base 2
    scale = scale.to(gl.float32)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    band_keys = None
    if PRODUCER:
        band_keys = (band_lo - n_list_tiles * BLOCK_N, band_hi)

    # Tile 0 alone: there is no earlier dS K to overlap.
    _wait_for_tile(ready, 0, STAGES, PRODUCER)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_smem, v_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s, dp, _, _, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp, q_smem, do_smem, k_ring.index(0),
                                                                     v_ring.index(0)))
    inside = _inside_every_window(0, n_list_tiles, band_lo, r0, WINDOW, BLOCK_M, BLOCK_N)
    ds, dtau = _dq_tile(s, dp, ring, 0, 0 < n_list_tiles, inside, offs_m, tau, lse2, delta, WINDOW, scale,
                        qk_scale2, GATE, band_keys)
    ds16 = gl.convert_layout(ds.to(dtype), ds_layout)
    if not PRODUCER:
        _issue_tile(ring, STAGES - 1, STAGES - 1, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src,
                    stride_kt, stride_vt, BLOCK_N, HEAD_DIM, ld, meta)

    for t in range(1, n_tiles):
        stage = t % STAGES
        prev = (t - 1) % STAGES
        _wait_for_tile(ready, t, STAGES, PRODUCER)
        k_t = k_ring.index(stage)
        v_t = v_ring.index(stage)
        k_prev = k_ring.index(prev)
        s = warpgroup_mma(q_smem, k_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_smem, v_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dq = warpgroup_mma(ds16, k_prev, dq, is_async=True)
        s, dp, _, _, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(s, dp, q_smem, do_smem, k_t, v_t))
        inside = _inside_every_window(t, n_list_tiles, band_lo, r0, WINDOW, BLOCK_M, BLOCK_N)
        if PRODUCER:
            band_keys = (band_lo + (t - n_list_tiles) * BLOCK_N, band_hi)
        ds, dtau_t = _dq_tile(s, dp, ring, stage, t < n_list_tiles, inside, offs_m, tau, lse2, delta, WINDOW,
                              scale, qk_scale2, GATE, band_keys)
        dtau += dtau_t
        dq, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds16, k_prev))
        if PRODUCER:
            gl.thread_barrier()                        # every warp is done with stage `prev`
            mbarrier.arrive(empty.index(prev), count=1)
        ds16 = gl.convert_layout(ds.to(dtype), ds_layout)
        if not PRODUCER:
            gl.thread_barrier()
            _issue_tile(ring, prev, t + STAGES - 1, n_list_tiles, list_base, N_SLOTS, band_lo, band_hi, src,
                        stride_kt, stride_vt, BLOCK_N, HEAD_DIM, ld, meta)

    k_last = k_ring.index(gl.maximum(n_tiles - 1, 0) % STAGES)
    dq = warpgroup_mma(ds16, k_last, dq, is_async=True)
    dq, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds16, k_last))
    if not PRODUCER:
        async_copy.wait_group(0)

    offs_mo = r0 + gl.arange(0, BLOCK_M, layout=rows_o)
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    dq_ptrs = (DQ + b.to(gl.int64) * stride_ob + hq * stride_oh + gl.expand_dims(offs_mo.to(gl.int64), 1) * stride_ot
               + gl.expand_dims(offs_do, 0))
    gl.store(dq_ptrs, dq.to(dtype), mask=gl.expand_dims(offs_mo < T, 1))
    gl.store(DTAU + pid_bh.to(gl.int64) * T + offs_m, dtau, mask=offs_m < T)


@gluon.jit
def sparsek_bwd_dq_gluon_kernel(
    Q, K, V, U, TAU, START, END, LISTS, DO, OUT, LSE, DELTA, DQ, DTAU,
    q_strides, k_strides, v_strides, o_strides,
    T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, scale,
    GATE: gl.constexpr, LIST_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
):
    """The dq pass of `kernels.sparsek_bwd_dq_kernel` (same outputs: dq, dtau and delta) over the forward's
    tiles and ring (`sparsek_fwd_gluon_kernel`). OUT, DO and DQ share o_strides."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    b, hq, row, r0, q_smem, ring, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles = _setup(
        Q, K, V, U, START, END, LISTS, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, LIST_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS)
    pid_bh = gl.program_id(1)
    do_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, HEAD_DIM], q_smem.type.layout)
    if PRODUCER_WARPS == 0:
        _dq_tiles(q_smem, do_smem, ring, None, None, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, b, hq,
                  row, r0, pid_bh, TAU, OUT, DO, LSE, DELTA, DQ, DTAU, stride_kt, stride_vt, stride_ob, stride_ot,
                  stride_oh, T, N_SLOTS, WINDOW, scale, GATE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, False)
    else:
        async_copy.wait_group(0)
        gl.thread_barrier()
        ready, empty = _ring_barriers(STAGES, PRODUCER_WARPS)
        gl.warp_specialize([
            (_dq_tiles, (q_smem, do_smem, ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi,
                         n_tiles, b, hq, row, r0, pid_bh, TAU, OUT, DO, LSE, DELTA, DQ, DTAU, stride_kt, stride_vt,
                         stride_ob, stride_ot, stride_oh, T, N_SLOTS, WINDOW, scale, GATE, BLOCK_M, BLOCK_N,
                         HEAD_DIM, STAGES, NUM_WARPS, True)),
            (_produce, (ring, ready, empty, src, list_base, n_list_tiles, band_lo, band_hi, n_tiles, stride_kt,
                        stride_vt, N_SLOTS, BLOCK_N, HEAD_DIM, STAGES, PRODUCER_WARPS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGISTERS])


@gluon.jit
def _fill_list_step(ring, kv, st, n_steps, blk_hi, sources, slot0, b, hk, stride_qb, stride_qt, stride_qh,
                    stride_ob, stride_ot, stride_oh, stride_kt, stride_vt, T, N_SLOTS, H_Q, GROUP,
                    SUBS: gl.constexpr, LIST_BLOCK: gl.constexpr, SUB_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, ld: gl.constexpr, meta: gl.constexpr):
    """Start the copies of list-pass step st into ring stage st % STAGES, as one commit group: the step's Q and
    dO rows [SUB_M, D] and their lse, delta and tau; on the first step of a block also the block's K and V rows
    (gathered by its list) and their keys' u and end, into the block's half of `kv`. A step past the last
    copies nothing (every row masked)."""
    q_ring, do_ring, lse_ring, delta_ring, tau_ring = ring
    k_kv, v_kv, u_kv, end_kv = kv
    LISTS_ROW, Q, DO, K_BASE, V_BASE, LSE, DELTA, U_ROW, END_ROW, TAU_ROW = sources
    stage = st % STAGES
    per_block = GROUP * SUBS
    valid = st < n_steps
    blk = blk_hi - 1 - st // per_block                   # blocks last first, as the tl pass walks them
    hq = hk * GROUP + (st // SUBS) % GROUP
    bh = (b * H_Q + hq).to(gl.int64)
    first = blk * LIST_BLOCK + (st % SUBS) * SUB_M
    rows = first + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, ld))
    ok = (rows < T) & valid
    _copy_rows(q_ring.index(stage), Q + b.to(gl.int64) * stride_qb + hq * stride_qh, rows, ok, stride_qt, HEAD_DIM,
               ld)
    _copy_rows(do_ring.index(stage), DO + b.to(gl.int64) * stride_ob + hq * stride_oh, rows, ok, stride_ot,
               HEAD_DIM, ld)
    rows_m = first + gl.arange(0, SUB_M, layout=meta)
    ok_m = (rows_m < T) & valid
    rows_m = gl.where(ok_m, rows_m, 0)
    async_copy.async_copy_global_to_shared(lse_ring.index(stage), LSE + bh * T + rows_m, mask=ok_m)
    async_copy.async_copy_global_to_shared(delta_ring.index(stage), DELTA + bh * T + rows_m, mask=ok_m)
    async_copy.async_copy_global_to_shared(tau_ring.index(stage), TAU_ROW + rows_m, mask=ok_m)
    if valid & (st % per_block == 0):
        half = (st // per_block) % 2
        slots = slot0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
        keys = gl.load(LISTS_ROW + blk.to(gl.int64) * N_SLOTS + slots, mask=slots < N_SLOTS, other=-1)
        _copy_rows(k_kv.index(half), K_BASE, keys, keys >= 0, stride_kt, HEAD_DIM, ld)
        _copy_rows(v_kv.index(half), V_BASE, keys, keys >= 0, stride_vt, HEAD_DIM, ld)
        slots_m = slot0 + gl.arange(0, BLOCK_N, layout=meta)
        keys_m = gl.load(LISTS_ROW + blk.to(gl.int64) * N_SLOTS + slots_m, mask=slots_m < N_SLOTS, other=-1)
        listed = keys_m >= 0
        keys_m = gl.where(listed, keys_m, 0)
        async_copy.async_copy_global_to_shared(u_kv.index(half), U_ROW + keys_m, mask=listed)
        async_copy.async_copy_global_to_shared(end_kv.index(half), END_ROW + keys_m, mask=listed)  # 0: empty slot
    async_copy.commit_group()


@gluon.jit
def _list_tile(s_t, dp_t, kv, half, stage, ring, offs_q, du, scale, qk_scale2, GATE: gl.constexpr):
    """One step's factors from S^T = K Q^T and dP^T = V dO^T [BLOCK_N keys, SUB_M queries] (float32): P^T times
    the mask (the factor of dV = P^T dO), dS^T (of dK = dS^T Q), and du plus the step's mask gradients over the
    keys' fractional pairs, as `kernels._bwd_tile` with KEYS_AS_ROWS. Query i keeps listed key j while
    i < end_j, with weight clip(u_j - tau_i, 0, 1)."""
    _, _, lse_ring, delta_ring, tau_ring = ring
    _, _, u_kv, end_kv = kv
    rows: gl.constexpr = gl.SliceLayout(1, s_t.type.layout)
    cols: gl.constexpr = gl.SliceLayout(0, s_t.type.layout)
    u_j = gl.expand_dims(u_kv.index(half).load(rows), 1)
    end_j = gl.expand_dims(end_kv.index(half).load(rows), 1)
    tau = gl.expand_dims(tau_ring.index(stage).load(cols), 0)
    lse2 = gl.expand_dims(lse_ring.index(stage).load(cols), 0)
    delta = gl.expand_dims(delta_ring.index(stage).load(cols), 0)
    weight = gl.where(gl.expand_dims(offs_q, 0) < end_j, gl.minimum(gl.maximum(u_j - tau, 0.0), 1.0), -1.0)
    pw, ds, dm = _softmax_grad(s_t, dp_t, weight, lse2, delta, scale, qk_scale2, GATE)
    if GATE != 2:
        du += gl.sum(gl.where((weight > 0.0) & (weight < 1.0), dm, 0.0), 1)
    return pw, ds, du


@gluon.jit
def _flush_list_slots(DK, DV, DU, keys, dk, dv, du, flush, dkv_base, du_base, stride_kt, HEAD_DIM: gl.constexpr,
                      ATOMIC: gl.constexpr):
    """`kernels._flush_slots` on wgmma accumulators: the sums dk, dv [BLOCK_N, D] and du [BLOCK_N] of the slots
    in `flush` go to their keys' rows of the float32 scratch (atomic adds when programs share a slot tile)."""
    acc: gl.constexpr = dk.type.layout
    rows = gl.convert_layout(gl.where(flush, keys, 0).to(gl.int64), gl.SliceLayout(1, acc))
    mask = gl.expand_dims(gl.convert_layout(flush, gl.SliceLayout(1, acc)), 1)
    offs = dkv_base + gl.expand_dims(rows, 1) * stride_kt + gl.expand_dims(gl.arange(0, HEAD_DIM,
                                                                                      layout=gl.SliceLayout(0, acc)), 0)
    du_rows = gl.where(flush, keys, 0).to(gl.int64)
    if ATOMIC:
        gl.atomic_add(DK + offs, dk, mask=mask, sem="relaxed")
        gl.atomic_add(DV + offs, dv, mask=mask, sem="relaxed")
        gl.atomic_add(DU + du_base + du_rows, du, mask=flush, sem="relaxed")
    else:
        gl.store(DK + offs, dk, mask=mask)
        gl.store(DV + offs, dv, mask=mask)
        gl.store(DU + du_base + du_rows, du, mask=flush)


# GROUP stays a runtime value: specialised to the constant 1 (one query head per KV head), the kernel fails an
# assertion in Triton 3.6's ConvertTritonGPUToLLVM with 32-query steps (compile-only on sm_90; the same kernel
# with GROUP = 1 as a runtime value compiles, and 64-query steps compile either way).
@gluon.jit(do_not_specialize=["GROUP"])
def sparsek_bwd_list_gluon_kernel(
    Q, K, V, U, TAU, END, LISTS, DO, LSE, DELTA, DK, DV, DU,
    q_strides, k_strides, v_strides, o_strides,
    T, N_SLOTS, N_BLOCKS, BLOCKS_PER_PROGRAM, WINDOW, H_Q, GROUP, scale,
    GATE: gl.constexpr, LIST_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, SUB_M: gl.constexpr,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, ATOMIC: gl.constexpr,
):
    """The list pass of `kernels.sparsek_bwd_list_kernel` (same grid, scratch and flushes): BLOCK_N slots of one
    selection row walk its list blocks, last first, as a sequence of steps (block, query head of the group,
    SUB_M queries of the block). Each step's Q and dO rows stream through a ring of STAGES shared-memory
    stages by cp.async, STAGES - 1 steps ahead; each block's K and V rows, gathered by its list, fill one half
    of a double buffer with the block's first step. Keys are the wgmma rows: S^T = K Q^T and dP^T = V dO^T,
    then dV += (P^T m) dO and dK += dS^T Q, accumulated in registers while a slot holds the same key."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    dtype: gl.constexpr = Q.dtype.element_ty
    SUBS: gl.constexpr = LIST_BLOCK // SUB_M
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, SUB_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1], [1, 0])
    meta: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    keys_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    pid_s = gl.program_id(0)
    pid_r = gl.program_id(1)
    pid_c = gl.program_id(2)
    h_k = H_Q // GROUP
    b = pid_r // h_k
    hk = pid_r % h_k
    slot0 = pid_s * BLOCK_N
    k_base = K + b.to(gl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(gl.int64) * stride_vb + hk * stride_vh
    dkv_base = b.to(gl.int64) * stride_kb + hk * stride_kh
    du_base = pid_r.to(gl.int64) * T
    lists_row = LISTS + pid_r.to(gl.int64) * N_BLOCKS * N_SLOTS
    blk_lo = pid_c * BLOCKS_PER_PROGRAM
    blk_hi = gl.minimum(blk_lo + BLOCKS_PER_PROGRAM, N_BLOCKS)
    blk_lo = gl.maximum(blk_lo, gl.cdiv(slot0 + WINDOW, LIST_BLOCK))   # lists still empty in these slots
    n_steps = gl.maximum(blk_hi - blk_lo, 0) * (GROUP * SUBS)

    row_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([SUB_M, HEAD_DIM], dtype)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    vec_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    ring = (gl.allocate_shared_memory(dtype, [STAGES, SUB_M, HEAD_DIM], row_sl),
            gl.allocate_shared_memory(dtype, [STAGES, SUB_M, HEAD_DIM], row_sl),
            gl.allocate_shared_memory(gl.float32, [STAGES, SUB_M], vec_sl),
            gl.allocate_shared_memory(gl.float32, [STAGES, SUB_M], vec_sl),
            gl.allocate_shared_memory(gl.float32, [STAGES, SUB_M], vec_sl))
    kv = (gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], kv_sl),
          gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], kv_sl),
          gl.allocate_shared_memory(gl.float32, [2, BLOCK_N], vec_sl),
          gl.allocate_shared_memory(gl.int32, [2, BLOCK_N], vec_sl))
    sources = (lists_row, Q, DO, k_base, v_base, LSE, DELTA, U + du_base, END + du_base, TAU + du_base)
    for p in gl.static_range(STAGES - 1):
        _fill_list_step(ring, kv, p, n_steps, blk_hi, sources, slot0, b, hk, stride_qb, stride_qt, stride_qh,
                        stride_ob, stride_ot, stride_oh, stride_kt, stride_vt, T, N_SLOTS, H_Q, GROUP, SUBS,
                        LIST_BLOCK, SUB_M, BLOCK_N, HEAD_DIM, STAGES, ld, meta)

    qk_scale2 = (scale * 1.4426950408889634).to(gl.float32)   # log2(e): the softmax runs in base 2
    scale = scale.to(gl.float32)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    du = gl.zeros([BLOCK_N], gl.float32, layout=keys_layout)
    held = gl.full([BLOCK_N], -1, gl.int32, layout=keys_layout)   # the key each slot accumulates for
    s_zero = gl.zeros([BLOCK_N, SUB_M], gl.float32, layout=s_layout)
    slots = slot0 + gl.arange(0, BLOCK_N, layout=keys_layout)
    for st in range(0, n_steps):
        stage = st % STAGES
        block_step = st // (GROUP * SUBS)
        half = block_step % 2
        blk = blk_hi - 1 - block_step
        if st % (GROUP * SUBS) == 0:                   # a new block: flush the slots whose key changes
            keys = gl.load(lists_row + blk.to(gl.int64) * N_SLOTS + slots, mask=slots < N_SLOTS, other=-1)
            changed = keys != held
            _flush_list_slots(DK, DV, DU, held, dk, dv, du, changed & (held >= 0), dkv_base, du_base, stride_kt,
                              HEAD_DIM, ATOMIC)
            zero = gl.expand_dims(gl.convert_layout(changed, gl.SliceLayout(1, acc_layout)), 1)
            dk = gl.where(zero, 0.0, dk)
            dv = gl.where(zero, 0.0, dv)
            du = gl.where(changed, 0.0, du)
            held = keys
        async_copy.wait_group(STAGES - 2)              # step st has landed (groups up to st + STAGES - 2 issued)
        _tile_landed()
        q_t = ring[0].index(stage)
        do_t = ring[1].index(stage)
        k_t = kv[0].index(half)
        v_t = kv[1].index(half)
        s_t = warpgroup_mma(k_t, q_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(v_t, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_t, dp_t, _, _, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, dp_t, k_t, v_t, q_t, do_t))
        first = blk * LIST_BLOCK + (st % SUBS) * SUB_M
        offs_q = first + gl.arange(0, SUB_M, layout=gl.SliceLayout(0, s_layout))
        pw, ds, du = _list_tile(s_t, dp_t, kv, half, stage, ring, offs_q, du, scale, qk_scale2, GATE)
        pw16 = gl.convert_layout(pw.to(dtype), op_layout)
        ds16 = gl.convert_layout(ds.to(dtype), op_layout)
        dv = warpgroup_mma(pw16, do_t, dv, is_async=True)
        dk = warpgroup_mma(ds16, q_t, dk, is_async=True)
        dv, dk, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, q_t, do_t))
        gl.thread_barrier()                            # no warp still reads stage `stage`: refill it
        _fill_list_step(ring, kv, st + STAGES - 1, n_steps, blk_hi, sources, slot0, b, hk, stride_qb, stride_qt,
                        stride_qh, stride_ob, stride_ot, stride_oh, stride_kt, stride_vt, T, N_SLOTS, H_Q, GROUP,
                        SUBS, LIST_BLOCK, SUB_M, BLOCK_N, HEAD_DIM, STAGES, ld, meta)
    async_copy.wait_group(0)                           # no copy may outlive the kernel's shared memory
    _flush_list_slots(DK, DV, DU, held, dk, dv, du, held >= 0, dkv_base, du_base, stride_kt, HEAD_DIM, ATOMIC)


def cannot_run(q: Tensor, *others: Tensor) -> str | None:
    """Why the Gluon forward cannot run on q [B, T, Hq, D] (and `others`, such as k and v), or None when it
    can: Triton 3.6, an sm_90 GPU, bf16 or fp16, head dim 64, 128 or 256, the forward's query blocks a multiple of
    the 64-row wgmma, and 16-byte aligned rows (cp.async copies 16 bytes; Triton compiles it only for pointers
    and strides it knows to be multiples of 16)."""
    if not gluon_api_supported():
        return f"it is written for Triton 3.6's Gluon API, and this is Triton {triton.__version__}"
    if not q.is_cuda or interpreting():
        return "it runs on CUDA tensors only (not under TRITON_INTERPRET)"
    if not on_sm90(q):
        return f"it runs on sm_90 (H100, H200) only, and this GPU is {torch.cuda.get_device_name(q.device)}"
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128, 256):
        return f"it takes bf16 or fp16 with head dim 64, 128 or 256, got {q.dtype} and {q.shape[-1]}"
    if tiles.forward(tiles.target(q.device), q.shape[-1])["BLOCK_M"] % 64:
        return "the forward's query block is not a multiple of 64"
    for x in (q, *others):
        if x.data_ptr() % 16 or any(stride % 16 for stride in x.stride()[:3]) or x.stride(-1) != 1:
            return "it needs 16-byte aligned rows: a data pointer and batch, token and head strides in multiples of 16"
    return None


def dq_pass_gluon(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, u: Tensor, tau: Tensor,
                  start: Tensor, end: Tensor, lists: Tensor, window: int, gate: str, scale: float,
                  **config) -> tuple[Tensor, Tensor, Tensor]:
    """`fused.dq_pass` through the Gluon kernel: dq (dtype of q), dtau and delta [B * Hq, T] (float32), from the
    forward's selection and lists (as in `fused_forward_gluon`); do and o [B, T, Hq, D]. Window already clamped
    to T. config overrides `tiles.gluon_dq` (keys_per_tile, stages, rows, producer_warps: see
    `fused_forward_gluon`)."""
    batch, t_len, n_q_heads, head_dim = q.shape
    do, o = do.contiguous(), o.contiguous()           # the kernel reads both, and writes dq, with one set of strides
    problem = cannot_run(q, k, v, do, o)
    if problem is not None:
        raise ValueError(f"the Gluon dq pass cannot run: {problem}")
    block_m = tiles.forward(tiles.target(q.device), head_dim)["BLOCK_M"]
    keys_per_tile, stages, rows, producer_warps = _config(tiles.gluon_dq(tiles.target(q.device), head_dim), config,
                                                          block_m, head_dim, 2)
    warps = rows // 16
    dq = empty_output(q.shape, q.dtype, q.device)
    dtau = empty_output((batch * n_q_heads, t_len), torch.float32, q.device)
    delta = empty_output((batch * n_q_heads, t_len), torch.float32, q.device)
    sparsek_bwd_dq_gluon_kernel[(triton.cdiv(t_len, rows), batch * n_q_heads)](
        q, k, v, u, tau, start, end, lists, do, o, lse, delta, dq, dtau, *grouped_strides(q, k, v, do), t_len,
        lists.shape[2], lists.shape[1], window, n_q_heads, n_q_heads // k.shape[2], scale, GATE=GATE_IDS[gate],
        LIST_BLOCK=block_m, BLOCK_M=rows, BLOCK_N=keys_per_tile, HEAD_DIM=head_dim, STAGES=stages, NUM_WARPS=warps,
        PRODUCER_WARPS=producer_warps, num_warps=warps, **({"maxnreg": 128} if producer_warps and rows == 64 else {}))
    return dq, dtau, delta


def list_pass_gluon(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, u: Tensor, tau: Tensor,
                    end: Tensor, lists: Tensor, topk: int, window: int, gate: str, scale: float,
                    **config) -> tuple[Tensor, Tensor, Tensor]:
    """`fused.list_pass` through the Gluon kernel: float32 dk, dv (shape of k) and du [R, T] of the pairs in the
    block lists, written only in the rows of listed keys (same grid and scratch). config overrides
    `tiles.gluon_list`: slots (keys per program: 64 or 128), rows (queries per step: 32 or 64) and stages."""
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    do = do.contiguous()
    problem = cannot_run(q, k, v, do)
    if problem is not None:
        raise ValueError(f"the Gluon list pass cannot run: {problem}")
    if topk == 0:                       # no key is listed and the band pass reads no scratch row
        empty = torch.empty(1, dtype=torch.float32, device=k.device)
        return empty, empty, empty
    block_m = tiles.forward(tiles.target(q.device), head_dim)["BLOCK_M"]
    settings = tiles.gluon_list(tiles.target(q.device), head_dim)
    if settings is None:
        raise ValueError(f"the Gluon list pass has no config at head dim {head_dim}")
    if not set(config) <= set(settings):
        raise ValueError(f"unknown Gluon list settings {sorted(set(config) - set(settings))}")
    settings.update(config)
    slots, rows, stages = settings["slots"], settings["rows"], settings["stages"]
    group = n_q_heads // n_kv_heads
    if slots not in (64, 128) or rows not in (32, 64) or stages < 2 or stages - 1 > group * (block_m // rows):
        raise ValueError(f"need slots 64 or 128, rows 32 or 64 and 2 <= stages <= 1 + steps per block, got "
                         f"{slots}, {rows}, {stages}")
    needed = 2 * 2 * slots * head_dim * 2 + stages * 2 * rows * head_dim * 2 + 2 * 8 * slots + 3 * 4 * stages * rows
    if needed > SM90_SHARED_BYTES:
        raise ValueError(f"slots {slots}, rows {rows} and {stages} stages need {needed} bytes of shared memory at "
                         f"D = {head_dim}; sm_90 gives a program at most {SM90_SHARED_BYTES}")
    n_blocks, n_slots = lists.shape[1], lists.shape[2]
    slot_tiles = triton.cdiv(n_slots, slots)
    # the tl pass's split of the blocks between programs
    chunks, blocks_per_program = list_pass_chunks(n_blocks, slot_tiles * batch * n_kv_heads, tiles.sm_count(q.device))
    scratch = torch.zeros if chunks > 1 else empty_output
    dk_list, dv_list = (scratch(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))
    du_list = scratch((batch * n_kv_heads, t_len), dtype=torch.float32, device=k.device)
    warps = slots // 16
    sparsek_bwd_list_gluon_kernel[(slot_tiles, batch * n_kv_heads, chunks)](
        q, k, v, u, tau, end, lists, do, lse, delta, dk_list, dv_list, du_list, *grouped_strides(q, k, v, do),
        t_len, n_slots, n_blocks, blocks_per_program, window, n_q_heads, group, scale, GATE=GATE_IDS[gate],
        LIST_BLOCK=block_m, BLOCK_N=slots, SUB_M=rows, HEAD_DIM=head_dim, STAGES=stages, NUM_WARPS=warps,
        ATOMIC=chunks > 1, num_warps=warps)
    return dk_list, dv_list, du_list


def shared_bytes(keys_per_tile: int, stages: int, rows: int, head_dim: int, row_tiles: int = 1) -> int:
    """Shared memory of one program: row_tiles tiles [rows, D] (Q; Q and dO in the dq pass) and a ring of stages
    of K and V tiles plus their keys' int32 / float32 key, u, start and end (16-bit q, k, v)."""
    return row_tiles * rows * head_dim * 2 + stages * (2 * keys_per_tile * head_dim * 2 + 4 * 4 * keys_per_tile)


def _config(defaults: dict, config: dict, block_m: int, head_dim: int,
            row_tiles: int) -> tuple[int, int, int, int]:
    """(keys per tile, stages, rows, producer warps): `defaults` (from ops/common/tiles.py) updated by the
    caller's config, checked against what the kernels take and sm_90's shared memory."""
    if not set(config) <= set(defaults):
        raise ValueError(f"unknown Gluon settings {sorted(set(config) - set(defaults))}; "
                         f"the settings are {sorted(defaults)}")
    defaults = dict(defaults, **config)
    keys_per_tile, stages, producer_warps = defaults["keys_per_tile"], defaults["stages"], defaults["producer_warps"]
    rows = defaults["rows"] or block_m
    if keys_per_tile not in (32, 64, 128) or stages < 2 or rows % 64 or block_m % rows or producer_warps not in (0, 4):
        raise ValueError(f"need keys_per_tile 32, 64 or 128, stages >= 2, rows a multiple of 64 dividing {block_m} "
                         f"and producer_warps 0 or 4, got {keys_per_tile}, {stages}, {rows}, {producer_warps}")
    needed = shared_bytes(keys_per_tile, stages, rows, head_dim, row_tiles)
    if needed > SM90_SHARED_BYTES:
        raise ValueError(f"keys_per_tile {keys_per_tile}, stages {stages} and rows {rows} need {needed} bytes of "
                         f"shared memory at D = {head_dim}; sm_90 gives a program at most {SM90_SHARED_BYTES}")
    return keys_per_tile, stages, rows, producer_warps


def fused_forward_gluon(q: Tensor, k: Tensor, v: Tensor, u: Tensor, tau: Tensor, start: Tensor, end: Tensor,
                        lists: Tensor, poison: Tensor, window: int, gate: str, scale: float,
                        **config) -> tuple[Tensor, Tensor]:
    """`fused.fused_forward` through the Gluon kernel: o [B, T, Hq, D] and lse [B * Hq, T] (log2 units) from the
    same selection (u, tau float32 and start, end int32, [R, T]; lists [R, NB, K] built with the forward's
    BLOCK_M; poison [1]). 16-bit q, k, v with a unit last stride, head dim 64, 128 or 256, on sm_90.

    config overrides `tiles.gluon_forward`, for tuning (`python -m sparsek.bench.gluon`): keys_per_tile (32, 64
    or 128), stages (>= 2), rows (query rows per program: the lists' block when None, or 64, which splits each
    block between two programs) and producer_warps (0: the attending warps fill the ring themselves; 4: a
    warp-specialised producer partition does)."""
    batch, t_len, n_q_heads, head_dim = q.shape
    problem = cannot_run(q, k, v)
    if problem is not None:
        raise ValueError(f"the Gluon forward cannot run: {problem}")
    window = min(window, t_len)
    block_m = tiles.forward(tiles.target(q.device), head_dim)["BLOCK_M"]       # the lists' query block
    if lists.shape[1] != triton.cdiv(t_len, block_m):
        raise ValueError(f"lists of {lists.shape[1]} blocks do not match query blocks of {block_m} at T = {t_len}")
    keys_per_tile, stages, rows, producer_warps = _config(tiles.gluon_forward(tiles.target(q.device), head_dim),
                                                          config, block_m, head_dim, 1)
    warps = rows // 16                                 # a warpgroup (4 warps) per 64 query rows of the wgmma
    o = empty_output(q.shape, q.dtype, q.device)
    lse = empty_output((batch * n_q_heads, t_len), torch.float32, q.device)
    sparsek_fwd_gluon_kernel[(triton.cdiv(t_len, rows), batch * n_q_heads)](
        q, k, v, u, tau, start, end, lists, o, lse, poison, *grouped_strides(q, k, v, o), t_len, lists.shape[2],
        lists.shape[1], window, n_q_heads, n_q_heads // k.shape[2], scale * LOG2E, GATE=GATE_IDS[gate],
        LIST_BLOCK=block_m, BLOCK_M=rows, BLOCK_N=keys_per_tile, HEAD_DIM=head_dim, STAGES=stages, NUM_WARPS=warps,
        PRODUCER_WARPS=producer_warps, num_warps=warps,
        # 4 attending + 4 producer warps: cap the registers so that two programs share an SM (otherwise each
        # asks for 256 and takes the whole register file)
        **({"maxnreg": 128} if producer_warps and rows == 64 else {}))
    return o, lse
