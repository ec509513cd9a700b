"""Triton kernels of the teacher mass (see reference.py for the definition): two passes, no T x T buffer.

Shape legend: B batch, T sequence, Hq / Hk query / KV heads, GROUP = Hq // Hk, D head dim (HEAD_DIM).
q, k: [B, T, H, D] with a unit last stride; lse: [B * Hq, T] float32 in log2 units; out: [B, T, Hk] float32.

1. Row pass, one program per (query block, batch * query head): the logsumexp of each query's causal row,
   by the online softmax of flash attention.
2. Column pass, one program per (key block, batch * KV head): walks the query blocks that can see its keys
   outside their window (i >= j + WINDOW) for every query head of the group, recomputes p_ij = exp2(s_ij -
   lse_i) and keeps the column sum and the column max. A program owns its keys, so no atomics are needed.
Softmax runs in base 2. DOT: tl.dot input precision, "ieee" for float32 inputs (no silent tf32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def teacher_lse_kernel(q_ptr, k_ptr, lse_ptr, T, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       qk_scale2, N_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    block = tl.program_id(0)
    row = tl.program_id(1)                                         # b * Hq + query head
    b, h_q = row // N_Q_HEADS, row % N_Q_HEADS
    h_k = h_q // GROUP
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + h_q * stride_qh
    q = tl.load(q_rows + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T,
                other=0.0)
    k_rows = k_ptr + b.to(tl.int64) * stride_kb + h_k * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, (block + 1) * BLOCK_M, BLOCK_N):           # keys up to the block's last query
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k_rows + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=offs_n[:, None] < T,
                     other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT) * qk_scale2
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + row.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def teacher_column_kernel(q_ptr, k_ptr, lse_ptr, sum_ptr, max_ptr, T, stride_qb, stride_qt, stride_qh, stride_kb,
                          stride_kt, stride_kh, qk_scale2, WINDOW, N_Q_HEADS: tl.constexpr,
                          N_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    block = tl.program_id(0)
    row = tl.program_id(1)                                         # b * Hk + KV head
    b, h_k = row // N_KV_HEADS, row % N_KV_HEADS
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_rows = k_ptr + b.to(tl.int64) * stride_kb + h_k * stride_kh
    kt = tl.load(k_rows + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=offs_n[:, None] < T,
                 other=0.0)
    col_sum = tl.zeros([BLOCK_N], tl.float32)
    col_max = tl.zeros([BLOCK_N], tl.float32)
    first = (block * BLOCK_N + WINDOW) // BLOCK_M * BLOCK_M        # the first query block that sees a key outside
    for g in range(GROUP):
        h_q = h_k * GROUP + g
        q_rows = q_ptr + b.to(tl.int64) * stride_qb + h_q * stride_qh
        lse_row = lse_ptr + (b * N_Q_HEADS + h_q).to(tl.int64) * T
        for m0 in range(first, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = tl.load(q_rows + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                        mask=offs_m[:, None] < T, other=0.0)
            lse = tl.load(lse_row + offs_m, mask=offs_m < T, other=float("inf"))
            s = tl.dot(kt, tl.trans(q), input_precision=DOT) * qk_scale2            # [keys, queries]
            outside = (offs_m[None, :] >= offs_n[:, None] + WINDOW) & (offs_m[None, :] < T)
            p = tl.where(outside, tl.exp2(s - lse[None, :]), 0.0)
            col_sum += tl.sum(p, 1)
            col_max = tl.maximum(col_max, tl.max(p, 1))
    out = b.to(tl.int64) * T * N_KV_HEADS + offs_n.to(tl.int64) * N_KV_HEADS + h_k   # [B, T, Hk]
    tl.store(sum_ptr + out, col_sum, mask=offs_n < T)
    tl.store(max_ptr + out, col_max, mask=offs_n < T)
