"""Draft: the SparseK attention forward in Gluon, Triton 3.6's lower-level dialect, for sm_90 (issue 22).

Status (2026-12-05): compiles for sm_90 with Triton 3.6 (tests/ops/test_attention_gluon.py); NOT YET RUN ON
A GPU, and not used by any path: `sparsek_attention` never calls it. `fused_forward_gluon` has the signature
of `fused.fused_forward`, so the GPU test compares the two outputs directly.

Same contract as `kernels.sparsek_fwd_kernel` (see that module's docstring): query block [i0, i0 + BLOCK_M) of
one query head attends its list (the keys selected at i0) and then its band (i0 - w, i0 + BLOCK_M), with the
mask m_ij = clip(u_j - tau_i, 0, 1) (1 in the window), an online softmax in base 2, o and lse (log2 units).
How it differs: K and V tiles are copied into shared memory with cp.async (gathered by key for the list), and
both products are Hopper wgmma, Q K^T from shared memory and P V with P in registers. This first version
waits for each copy and each product before the softmax math; overlapping them (the next tile's copies and
Q K^T while this tile's softmax runs, producer warps) is what should make it faster than the `tl` kernel.

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
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from ..common import GATE_IDS, LOG2E, tiles

KEYS_PER_TILE = 64    # the N of the Q K^T wgmma


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
def _attend_tile(q_smem, k_smem, v_smem, acc, m_i, l_i, weight, allowed, qk_scale2, GATE: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """One online-softmax step over the K, V tile in shared memory (as `softmax_tile` with MASKED)."""
    async_copy.wait_group(0)
    gl.thread_barrier()                      # every thread's copies have landed
    fence_async_shared()                     # and are visible to the wgmma (async proxy)
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[0]
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    s = warpgroup_mma(q_smem, k_smem.permute((1, 0)), s, use_acc=False, is_async=True)
    s, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(s, q_smem, k_smem))  # every operand it reads
    if GATE == 0:
        s = s * (weight * qk_scale2)
    else:
        s = s * qk_scale2
    s = gl.where(allowed, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    if GATE != 2:
        p = p * weight
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    acc = acc * gl.expand_dims(alpha_o, 1)
    p16 = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    acc = warpgroup_mma(p16, v_smem, acc, is_async=True)
    acc, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16, v_smem))
    gl.thread_barrier()                      # the tile's buffers may be refilled after this
    return acc, m_new, l_i


@gluon.jit
def sparsek_fwd_gluon_kernel(
    Q, K, V, U, TAU, START, END, LISTS, OUT, LSE, POISON,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, qk_scale2,
    GATE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    NUM_WARPS: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    # Register layouts: S [BLOCK_M, BLOCK_N] and O [BLOCK_M, D] as wgmma accumulators, P as wgmma's A operand
    # from registers, and a blocked layout whose threads each move 16 bytes for the copies.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1], [1, 0])
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)     # one value per query of S
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)     # one value per key of S
    rows_ld: gl.constexpr = gl.SliceLayout(1, ld)          # one value per copied row

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H_Q
    hq = pid_bh % H_Q
    hk = hq // GROUP
    row = b * (H_Q // GROUP) + hk
    i0 = pid_m * BLOCK_M

    offs_q = i0 + gl.arange(0, BLOCK_M, layout=rows_ld)
    q_base = Q + b.to(gl.int64) * stride_qb + hq * stride_qh
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_sl)
    _copy_rows(q_smem, q_base, offs_q, offs_q < T, stride_qt, HEAD_DIM, ld)
    async_copy.commit_group()
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_sl)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_sl)
    k_base = K + b.to(gl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(gl.int64) * stride_vb + hk * stride_vh
    u_row = U + row.to(gl.int64) * T
    start_row = START + row.to(gl.int64) * T
    end_row = END + row.to(gl.int64) * T

    offs_m = i0 + gl.arange(0, BLOCK_M, layout=rows_s)
    tau = gl.load(TAU + row.to(gl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=rows_s)  # finite: a fully masked tile gives no NaN
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    qk_scale2 = qk_scale2.to(gl.float32)

    # Phase 1: the keys selected by the block's first query (the filled slots only).
    list_base = LISTS + (row.to(gl.int64) * N_BLOCKS + pid_m) * N_SLOTS
    n_listed = gl.minimum(N_SLOTS, gl.maximum(i0 - WINDOW + 1, 0))
    for s0 in range(0, n_listed, BLOCK_N):
        slots_ld = s0 + gl.arange(0, BLOCK_N, layout=rows_ld)
        keys_ld = gl.load(list_base + slots_ld, mask=slots_ld < N_SLOTS, other=-1)
        _copy_rows(k_smem, k_base, keys_ld, keys_ld >= 0, stride_kt, HEAD_DIM, ld)
        _copy_rows(v_smem, v_base, keys_ld, keys_ld >= 0, stride_vt, HEAD_DIM, ld)
        async_copy.commit_group()
        slots = s0 + gl.arange(0, BLOCK_N, layout=cols_s)
        keys = gl.load(list_base + slots, mask=slots < N_SLOTS, other=-1)
        key_ok = keys >= 0
        keys = gl.where(key_ok, keys, 0).to(gl.int64)
        u_j = gl.load(u_row + keys, mask=key_ok, other=0.0)
        end_j = gl.load(end_row + keys, mask=key_ok, other=0)     # 0 for empty slots
        allowed = gl.expand_dims(offs_m, 1) < gl.expand_dims(end_j, 0)
        weight = gl.minimum(gl.maximum(gl.expand_dims(u_j, 0) - gl.expand_dims(tau, 1), 0.0), 1.0)
        acc, m_i, l_i = _attend_tile(q_smem, k_smem, v_smem, acc, m_i, l_i, weight, allowed, qk_scale2, GATE,
                                     s_layout, o_layout, p_layout)

    # Phase 2: the band (i0 - w, i0 + BLOCK_M), every tile masked (the tl kernel skips the mask math on the
    # tiles inside every query's window; not yet here).
    band_lo = gl.maximum(i0 - WINDOW + 1, 0)
    band_hi = gl.minimum(i0 + BLOCK_M, T)
    for j0 in range(band_lo, band_hi, BLOCK_N):
        offs_ld = j0 + gl.arange(0, BLOCK_N, layout=rows_ld)
        _copy_rows(k_smem, k_base, offs_ld, offs_ld < band_hi, stride_kt, HEAD_DIM, ld)
        _copy_rows(v_smem, v_base, offs_ld, offs_ld < band_hi, stride_vt, HEAD_DIM, ld)
        async_copy.commit_group()
        offs_n = j0 + gl.arange(0, BLOCK_N, layout=cols_s)
        key_ok = offs_n < band_hi
        u_j = gl.load(u_row + offs_n, mask=key_ok, other=0.0)
        start_j = gl.load(start_row + offs_n, mask=key_ok, other=0)
        end_j = gl.load(end_row + offs_n, mask=key_ok, other=0)
        i = gl.expand_dims(offs_m, 1)
        j = gl.expand_dims(offs_n, 0)
        in_window = (j <= i) & (j > i - WINDOW)
        selected = (gl.expand_dims(start_j, 0) <= i) & (i < gl.expand_dims(end_j, 0)) & gl.expand_dims(key_ok, 0)
        allowed = gl.expand_dims(key_ok, 0) & (in_window | selected)
        gap = gl.expand_dims(u_j, 0) - gl.expand_dims(tau, 1)
        weight = gl.where(in_window, 1.0, gl.minimum(gl.maximum(gap, 0.0), 1.0))
        acc, m_i, l_i = _attend_tile(q_smem, k_smem, v_smem, acc, m_i, l_i, weight, allowed, qk_scale2, GATE,
                                     s_layout, o_layout, p_layout)

    l_safe = gl.where(l_i > 0, l_i, 1.0)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, rows_o), 1) + gl.load(POISON)
    offs_mo = i0 + gl.arange(0, BLOCK_M, layout=rows_o)
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    out_ptrs = (OUT + b.to(gl.int64) * stride_ob + hq * stride_oh + gl.expand_dims(offs_mo.to(gl.int64), 1) * stride_ot
                + gl.expand_dims(offs_do, 0))
    gl.store(out_ptrs, o.to(dtype), mask=gl.expand_dims(offs_mo < T, 1))
    gl.store(LSE + pid_bh.to(gl.int64) * T + offs_m, m_i + gl.log2(l_safe), mask=offs_m < T)


def fused_forward_gluon(q: Tensor, k: Tensor, v: Tensor, u: Tensor, tau: Tensor, start: Tensor, end: Tensor,
                        lists: Tensor, poison: Tensor, window: int, gate: str, scale: float) -> tuple[Tensor, Tensor]:
    """`fused.fused_forward` through the Gluon kernel: o [B, T, Hq, D] and lse [B * Hq, T] (log2 units) from the
    same selection (u, tau float32 and start, end int32, [R, T]; lists [R, NB, K] built with the forward's
    BLOCK_M; poison [1]). 16-bit q, k, v with a unit last stride, head dim 64 or 128, on sm_90."""
    batch, t_len, n_q_heads, head_dim = q.shape
    if not gluon_api_supported():
        raise RuntimeError(f"the Gluon forward is written for Triton 3.6, this is {triton.__version__}")
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        raise ValueError("the Gluon forward runs on sm_90 (H100, H200) only")
    if q.dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128):
        raise ValueError(f"the Gluon forward takes bf16 or fp16 and head dim 64 or 128, got {q.dtype}, {head_dim}")
    window = min(window, t_len)
    block_m = tiles.forward(tiles.target(q.device), head_dim)["BLOCK_M"]       # the lists' query block
    if block_m % 64 or lists.shape[1] != triton.cdiv(t_len, block_m):
        raise ValueError(f"lists of {lists.shape[1]} blocks do not match query blocks of {block_m} at T = {t_len}")
    warps = block_m // 16                              # a warpgroup (4 warps) per 64 query rows of the wgmma
    o = torch.empty_like(q)
    lse = torch.empty(batch * n_q_heads, t_len, dtype=torch.float32, device=q.device)
    strides = [s for x in (q, k, v, o) for s in x.stride()[:3]]
    sparsek_fwd_gluon_kernel[(lists.shape[1], batch * n_q_heads)](
        q, k, v, u, tau, start, end, lists, o, lse, poison, *strides, t_len, lists.shape[2], lists.shape[1],
        window, n_q_heads, n_q_heads // k.shape[2], scale * LOG2E, GATE=GATE_IDS[gate], BLOCK_M=block_m,
        BLOCK_N=KEYS_PER_TILE, HEAD_DIM=head_dim, NUM_WARPS=warps, num_warps=warps)
    return o, lse
