"""Triton kernels of single-token decode attention over a SparseK KV cache (flash-decoding).

Shape legend: B batch, H KV heads, GROUP = Hq // H query heads per KV head (padded to BLOCK_G rows, at
least 16 for tl.dot), N cache entries, D head dim (HEAD_DIM), S splits of the entries.
q [B, Hq, D], k, v [B, H, N, D] with a unit last stride; weight (float32) and attended (uint8) [B * H, N]
contiguous; out [B * Hq, D] contiguous. Partials of a split: m, l [B * Hq, S] and acc [B * Hq, S, D] (float32).

One program handles one (batch row, KV head, split): all GROUP query heads of the group share every key and
value tile it loads, so each cache entry is read once per step. The entries are split across programs when
B * H alone would leave most of the GPU idle; a second kernel then merges the splits' online-softmax states.
Softmax runs in base 2, as in the prefill kernels whose tile step is reused here.

GATE: 0 = "kv" (logits scaled by m, values by m), 1 = "v" (values by m), 2 = "none".
DOT: tl.dot input precision, "ieee" for float32 inputs (no silent tf32), "tf32" (ignored) for 16-bit inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.kernels import softmax_tile


@triton.jit
def decode_fwd_kernel(
    Q, K, V, WEIGHT, ATTENDED, OUT, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    N, H, GROUP, SPLIT_LEN, N_SPLITS, qk_scale2,
    GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    FINAL: tl.constexpr,
):
    """Entries [s * SPLIT_LEN, (s + 1) * SPLIT_LEN) of one (batch row, KV head). FINAL (one split): the
    normalised output goes to OUT; otherwise the split's max, sum and accumulator go to the partials."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    hq = h * GROUP + offs_g                          # query heads of the group; padded rows are never stored
    row_q = b.to(tl.int64) * H * GROUP + hq          # row of [B * Hq, ...] outputs and partials

    q = tl.load(Q + b.to(tl.int64) * stride_qb + hq[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    w_row = WEIGHT + pid_bh.to(tl.int64) * N
    a_row = ATTENDED + pid_bh.to(tl.int64) * N

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)  # finite: a split with nothing attended must not give NaN
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)

    n_lo = pid_s * SPLIT_LEN
    n_hi = tl.minimum(n_lo + SPLIT_LEN, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=n_ok[:, None],
                     other=0.0)
        vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=n_ok[:, None],
                     other=0.0)
        weight = tl.load(w_row + offs_n, mask=n_ok, other=0.0)
        allowed = tl.load(a_row + offs_n, mask=n_ok, other=0) != 0
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kt, vt, weight[None, :], allowed[None, :], qk_scale2, GATE,
                                     DOT, True)

    if FINAL:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]   # nothing attended: l = 0 and acc = 0, so o = 0
        tl.store(OUT + row_q[:, None] * HEAD_DIM + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=g_ok[:, None])
    else:
        part = row_q * N_SPLITS + pid_s
        tl.store(M_PART + part, m_i, mask=g_ok)
        tl.store(L_PART + part, l_i, mask=g_ok)
        tl.store(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def decode_combine_kernel(M_PART, L_PART, ACC_PART, OUT, N_SPLITS, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the S splits of one query row: out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s."""
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < N_SPLITS
    part = row.to(tl.int64) * N_SPLITS + offs_s
    m_s = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))   # padding weighs 2^-inf = 0
    l_s = tl.load(L_PART + part, mask=s_ok, other=0.0)
    acc_s = tl.load(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    # Every real split stores a finite max (at least -1e30), so the row max is finite and no 2^(inf - inf).
    alpha = tl.exp2(m_s - tl.max(m_s, 0))
    l_sum = tl.sum(l_s * alpha, 0)
    o = tl.sum(acc_s * alpha[:, None], 0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(OUT + row.to(tl.int64) * HEAD_DIM + offs_d, o.to(OUT.dtype.element_ty))
