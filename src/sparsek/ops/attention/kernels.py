"""Triton kernels of fused SparseK attention: forward, and the three passes of the backward.

Shape legend: B batch, T sequence, Hq / Hk query / KV heads, GROUP = Hq // Hk, D head dim (HEAD_DIM);
R = B * Hk selection rows; NB query blocks of BLOCK_M queries; K = N_SLOTS slots per block list.
q, k, v, o, do, dq: [B, T, H, D] with a unit last stride. Per-key and per-query vectors of a selection row
(u, tau, start, end, du) are [R, T]; lse and delta are [B * Hq, T]; lists are [R, NB, K] int32.

The keys of query block [i0, i0 + BLOCK_M) are visited in two phases that never overlap:
  1. the list: the keys selected by query i0 (slot array of block b, see ops/select/blocks.py); query i keeps
     key j while i < end_j;
  2. the band (i0 - w, i0 + BLOCK_M): the sliding windows of the block's queries plus the keys that became
     candidates inside the block; pair (i, j) counts if j is in i's window or selected by i.
The blocks of the lists (LIST_BLOCK) fix this split; the dq and band passes may walk smaller query tiles, each
taking the list of its list block l0 and the band (l0 - w, i0 + BLOCK_M).
The mask m_ij = clip(u_j - tau_i, 0, 1) (1 in the window) is computed on the fly; band tiles that lie in the
window of every query of a tile skip that math. Nothing of size T x T or T x topk per query exists. Softmax
runs in base 2 (lse in log2 units).

Backward: dq and the threshold gradient dtau come from a query-major pass over the same two phases (which
also writes delta = rowsum(dO * O) for the other two); dk, dv and the direct score gradient du from two
key-major passes. The list pass walks each tile of slots through the blocks (last first) and writes a slot's
sums to its key's rows of a float32 scratch when the key changes (each key lives in one slot for one run of
blocks, so one store per key; atomic adds into a zeroed scratch only when the blocks are split between
programs). The band pass then walks each key tile over the query tiles whose band contains it, adds the
scratch rows of the keys that were listed, and stores dk, dv in the dtype of k, v.

GATE: 0 = "kv" (logits scaled by m, values by m), 1 = "v" (values by m), 2 = "none" (hard selection).
DOT: tl.dot input precision, "ieee" for float32 inputs (no silent tf32), "tf32" (ignored) for 16-bit inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.kernels import softmax_tile
from ..select.kernels import in_some_list


@triton.jit
def _bwd_tile(q, do, kt, vt, weight, allowed, lse2, delta, scale, GATE: tl.constexpr, DOT: tl.constexpr,
              MASKED: tl.constexpr, KEYS_AS_ROWS: tl.constexpr):
    """Recompute one tile and return (p * m, dlogit * m * scale, dm): the factors of dv, of dq / dk, and
    the gradient of the mask (zero for gate "none"). [queries, keys] for the dq pass; KEYS_AS_ROWS: [keys,
    queries] for the key-major passes, whose dk, dv products then take the tile as it is, with the keys as
    the rows of every product: that makes them wgmma products on Hopper once a tile has 64 keys (the old
    [queries, keys] tiles of 32 keys made dS^T q and P^T dO mma.sync). weight and allowed come in the same
    orientation. MASKED False: a tile inside every query's window, where m = 1 and no mask gradient flows
    (weight and allowed are None, dm is zero)."""
    if KEYS_AS_ROWS:
        qk = tl.dot(kt, tl.trans(q), input_precision=DOT)
        lse2 = lse2[None, :]
        delta = delta[None, :]
        a = tl.dot(vt, tl.trans(do), input_precision=DOT)                                  # v_j . dO_i
    else:
        qk = tl.dot(q, tl.trans(kt), input_precision=DOT)
        lse2 = lse2[:, None]
        delta = delta[:, None]
        a = tl.dot(do, tl.trans(vt), input_precision=DOT)                                  # dO_i . v_j
    if MASKED:
        if GATE == 0:
            logit = qk * (weight * scale)
        else:
            logit = qk * scale
        p = tl.where(allowed, tl.exp2(logit * 1.4426950408889634 - lse2), 0.0)             # 1.44... = log2(e)
    else:
        p = tl.exp2(qk * (scale * 1.4426950408889634) - lse2)
    if not MASKED or GATE == 2:                 # m = 1 (or a hard selection): no mask factors, no dm
        pw = p
        ds = p * (a - delta) * scale
        dm = tl.zeros_like(p)
    else:
        dlogit = p * (weight * a - delta)
        pw = p * weight
        if GATE == 0:
            ds = dlogit * (weight * scale)
            dm = p * a + dlogit * scale * qk
        else:
            ds = dlogit * scale
            dm = p * a
    return pw, ds, dm


@triton.jit
def _list_tile(list_base, s0, N_SLOTS, k_base, v_base, u_row, end_row, stride_kt, stride_vt, offs_m, offs_d, tau,
               BLOCK_N: tl.constexpr):
    """Slots [s0, s0 + BLOCK_N) of a block's list: k, v [BLOCK_N, D] gathered by key, and for the queries offs_m
    which pairs attend (query i keeps key j while i < e_j), the mask m and the gap u_j - tau_i."""
    offs_s = s0 + tl.arange(0, BLOCK_N)
    keys = tl.load(list_base + offs_s, mask=offs_s < N_SLOTS, other=-1)
    key_ok = keys >= 0
    keys = tl.where(key_ok, keys, 0).to(tl.int64)
    kt = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    vt = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    u_j = tl.load(u_row + keys, mask=key_ok, other=0.0)
    end_j = tl.load(end_row + keys, mask=key_ok, other=0)       # 0 for empty slots; end_j <= T
    allowed = offs_m[:, None] < end_j[None, :]
    gap = u_j[None, :] - tau[:, None]
    return kt, vt, allowed, tl.minimum(tl.maximum(gap, 0.0), 1.0), gap


@triton.jit
def _listed_slots(i0, N_SLOTS, WINDOW):
    """How many slots of the list of the block starting at query i0 can hold a key: the slots fill in order
    (the first K keys take slots 0..K-1, ops/select/blocks.py) and i0 has i0 - w + 1 candidates. The slots
    past that are empty during the first topk + w queries: at topk = 1024 and w = 512 a quarter of the list
    tiles at T = 4k, an eighth at 8k. The forward and the list pass skip them; in the dq pass skipping them
    measured slower at 128k on an H100 (docs/kernels.md)."""
    return tl.minimum(N_SLOTS, tl.maximum(i0 - WINDOW + 1, 0))


@triton.jit
def _band_kv(j0, k_base, v_base, stride_kt, stride_vt, offs_d, key_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """k, v [BLOCK_N, D] of the keys [j0, j0 + BLOCK_N) (MASKED False: all of them exist; key_ok unused)."""
    kv_offs = (j0 + tl.arange(0, BLOCK_N))[:, None].to(tl.int64)
    if MASKED:
        kt = tl.load(k_base + kv_offs * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        vt = tl.load(v_base + kv_offs * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    else:
        kt = tl.load(k_base + kv_offs * stride_kt + offs_d[None, :])
        vt = tl.load(v_base + kv_offs * stride_vt + offs_d[None, :])
    return kt, vt


@triton.jit
def _inner_run(lo, hi, inner_lo, inner_hi, STEP: tl.constexpr):
    """Split the tiles lo, lo + STEP, ... below hi into three runs [lo, a), [a, b), [b, hi) such that every
    tile of [a, b) lies inside [inner_lo, inner_hi) and below hi; a and b are tile starts (or hi). Used to
    skip the mask math on the tiles where every pair attends, like FlashAttention's split of full causal tiles
    from the diagonal. Key positions in the forward and dq kernels, query tile indices (STEP 1) in the band
    pass. Every operand of // and cdiv here is >= 0, so Triton's rounding toward zero does not matter."""
    a = tl.minimum(lo + tl.cdiv(tl.maximum(inner_lo - lo, 0), STEP) * STEP, hi)
    b = a + tl.maximum(tl.minimum(inner_hi, hi) - a, 0) // STEP * STEP
    return a, b


@triton.jit
def _band_tile(j0, band_hi, k_base, v_base, u_row, start_row, end_row, stride_kt, stride_vt, offs_m, offs_d, tau,
               WINDOW, BLOCK_N: tl.constexpr):
    """Keys [j0, j0 + BLOCK_N) of a block's band: k, v [BLOCK_N, D], and for the queries offs_m which pairs
    attend (window or selected), which are selected, the mask m (1 in the window) and the gap u_j - tau_i."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < band_hi
    kt, vt = _band_kv(j0, k_base, v_base, stride_kt, stride_vt, offs_d, key_ok, BLOCK_N, True)
    u_j = tl.load(u_row + offs_n, mask=key_ok, other=0.0)
    start_j = tl.load(start_row + offs_n, mask=key_ok, other=0)
    end_j = tl.load(end_row + offs_n, mask=key_ok, other=0)
    in_window = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - WINDOW)
    selected = (start_j[None, :] <= offs_m[:, None]) & (offs_m[:, None] < end_j[None, :]) & key_ok[None, :]
    allowed = key_ok[None, :] & (in_window | selected)
    gap = u_j[None, :] - tau[:, None]
    weight = tl.where(in_window, 1.0, tl.minimum(tl.maximum(gap, 0.0), 1.0))
    return kt, vt, allowed, selected, weight, gap


@triton.jit
def _query_block(Q, K, V, U, TAU, START, END, pid_m, pid_bh, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh,
                 stride_vb, stride_vh, T, H_Q, GROUP, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """What a query-major program (query block pid_m, query head row pid_bh) starts from: its batch, head and
    selection row, query offsets, queries [BLOCK_M, D] and thresholds, and the bases of its KV head's rows."""
    b = pid_bh // H_Q
    hq = pid_bh % H_Q
    hk = hq // GROUP
    row = b * (H_Q // GROUP) + hk
    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b.to(tl.int64) * stride_qb + hq * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tau = tl.load(TAU + row.to(tl.int64) * T + offs_m, mask=row_ok, other=float("-inf"))
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    u_row = U + row.to(tl.int64) * T
    start_row = START + row.to(tl.int64) * T
    end_row = END + row.to(tl.int64) * T
    return b, hq, row, i0, offs_m, offs_d, row_ok, q, tau, k_base, v_base, u_row, start_row, end_row


@triton.jit
def sparsek_fwd_kernel(
    Q, K, V, U, TAU, START, END, LISTS, OUT, LSE, POISON,
    q_strides, k_strides, v_strides, o_strides,
    T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, qk_scale2,
    GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """o and lse (log2 units). POISON [1] float32 is 0, or NaN when the scores were not finite: it is added to
    every output, so that bad scores show without a host-side check."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hq, row, i0, offs_m, offs_d, row_ok, q, tau, k_base, v_base, u_row, start_row, end_row = _query_block(
        Q, K, V, U, TAU, START, END, pid_m, pid_bh, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb,
        stride_vh, T, H_Q, GROUP, BLOCK_M, HEAD_DIM)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile must not give NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Phase 1: the keys selected by the block's first query.
    list_base = LISTS + (row.to(tl.int64) * N_BLOCKS + pid_m) * N_SLOTS
    for s0 in range(0, _listed_slots(i0, N_SLOTS, WINDOW), BLOCK_N):
        kt, vt, allowed, weight, _ = _list_tile(list_base, s0, N_SLOTS, k_base, v_base, u_row, end_row, stride_kt,
                                                stride_vt, offs_m, offs_d, tau, BLOCK_N)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kt, vt, weight, allowed, qk_scale2, GATE, DOT, True)

    # Phase 2: the band (i0 - w, i0 + BLOCK_M): windows and keys that became candidates in the block. Keys
    # [i0 + BLOCK_M - w, i0] lie in every query's window: their tiles skip the mask.
    band_lo = tl.maximum(i0 - WINDOW + 1, 0)
    band_hi = tl.minimum(i0 + BLOCK_M, T)
    full_lo, full_hi = _inner_run(band_lo, band_hi, i0 + BLOCK_M - WINDOW, i0 + 1, BLOCK_N)
    for j0 in range(band_lo, full_lo, BLOCK_N):
        kt, vt, allowed, _, weight, _ = _band_tile(j0, band_hi, k_base, v_base, u_row, start_row, end_row, stride_kt,
                                                   stride_vt, offs_m, offs_d, tau, WINDOW, BLOCK_N)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kt, vt, weight, allowed, qk_scale2, GATE, DOT, True)
    for j0 in range(full_lo, full_hi, BLOCK_N):
        kt, vt = _band_kv(j0, k_base, v_base, stride_kt, stride_vt, offs_d, None, BLOCK_N, False)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kt, vt, None, None, qk_scale2, GATE, DOT, False)
    for j0 in range(full_hi, band_hi, BLOCK_N):
        kt, vt, allowed, _, weight, _ = _band_tile(j0, band_hi, k_base, v_base, u_row, start_row, end_row, stride_kt,
                                                   stride_vt, offs_m, offs_d, tau, WINDOW, BLOCK_N)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kt, vt, weight, allowed, qk_scale2, GATE, DOT, True)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None] + tl.load(POISON)
    tl.store(OUT + b.to(tl.int64) * stride_ob + hq * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot
             + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _dq_band_tile(dq, dtau, j0, band_hi, q, do, lse2, delta, k_base, v_base, u_row, start_row, end_row, stride_kt,
                  stride_vt, offs_m, offs_d, tau, WINDOW, scale, GATE: tl.constexpr, DOT: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """dq and dtau of a query tile plus one masked tile of its band."""
    kt, vt, allowed, selected, weight, gap = _band_tile(j0, band_hi, k_base, v_base, u_row, start_row, end_row,
                                                        stride_kt, stride_vt, offs_m, offs_d, tau, WINDOW, BLOCK_N)
    _, ds, dm = _bwd_tile(q, do, kt, vt, weight, allowed, lse2, delta, scale, GATE, DOT, True, False)
    dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT)
    dtau -= tl.sum(tl.where(selected & (gap > 0.0) & (gap < 1.0), dm, 0.0), 1)
    return dq, dtau


@triton.jit
def sparsek_bwd_dq_kernel(
    Q, K, V, U, TAU, START, END, LISTS, DO, OUT, LSE, DELTA, DQ, DTAU,
    q_strides, k_strides, v_strides, o_strides,
    T, N_SLOTS, N_BLOCKS, WINDOW, H_Q, GROUP, scale,
    GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    LIST_BLOCK: tl.constexpr,
):
    """dq [B, T, Hq, D] (strides of do), dtau [B * Hq, T] = -sum_j dm_ij over fractional selected j, and
    delta [B * Hq, T] = rowsum(dO * O), which the other two passes read (OUT, the forward's output, has the
    strides of do). A query tile of BLOCK_M takes the list and the band of the list block (LIST_BLOCK, a
    multiple of BLOCK_M; N_BLOCKS list blocks) that contains it."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hq, row, i0, offs_m, offs_d, row_ok, q, tau, k_base, v_base, u_row, start_row, end_row = _query_block(
        Q, K, V, U, TAU, START, END, pid_m, pid_bh, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb,
        stride_vh, T, H_Q, GROUP, BLOCK_M, HEAD_DIM)
    do_offs = b.to(tl.int64) * stride_ob + hq * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :]
    do = tl.load(DO + do_offs, mask=row_ok[:, None], other=0.0)
    o = tl.load(OUT + do_offs, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dtau = tl.zeros([BLOCK_M], dtype=tl.float32)

    list_block = i0 // LIST_BLOCK
    list_base = LISTS + (row.to(tl.int64) * N_BLOCKS + list_block) * N_SLOTS
    for s0 in range(0, N_SLOTS, BLOCK_N):
        kt, vt, allowed, weight, gap = _list_tile(list_base, s0, N_SLOTS, k_base, v_base, u_row, end_row, stride_kt,
                                                  stride_vt, offs_m, offs_d, tau, BLOCK_N)
        _, ds, dm = _bwd_tile(q, do, kt, vt, weight, allowed, lse2, delta, scale, GATE, DOT, True, False)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT)
        dtau -= tl.sum(tl.where(allowed & (gap > 0.0) & (gap < 1.0), dm, 0.0), 1)

    # The band; keys [i0 + BLOCK_M - w, i0] lie in every query's window (no mask, no dtau).
    band_lo = tl.maximum(list_block * LIST_BLOCK - WINDOW + 1, 0)
    band_hi = tl.minimum(i0 + BLOCK_M, T)
    full_lo, full_hi = _inner_run(band_lo, band_hi, i0 + BLOCK_M - WINDOW, i0 + 1, BLOCK_N)
    for j0 in range(band_lo, full_lo, BLOCK_N):
        dq, dtau = _dq_band_tile(dq, dtau, j0, band_hi, q, do, lse2, delta, k_base, v_base, u_row, start_row,
                                 end_row, stride_kt, stride_vt, offs_m, offs_d, tau, WINDOW, scale, GATE, DOT, BLOCK_N)
    for j0 in range(full_lo, full_hi, BLOCK_N):
        kt, vt = _band_kv(j0, k_base, v_base, stride_kt, stride_vt, offs_d, None, BLOCK_N, False)
        _, ds, _ = _bwd_tile(q, do, kt, vt, None, None, lse2, delta, scale, GATE, DOT, False, False)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT)
    for j0 in range(full_hi, band_hi, BLOCK_N):
        dq, dtau = _dq_band_tile(dq, dtau, j0, band_hi, q, do, lse2, delta, k_base, v_base, u_row, start_row,
                                 end_row, stride_kt, stride_vt, offs_m, offs_d, tau, WINDOW, scale, GATE, DOT, BLOCK_N)

    tl.store(DQ + do_offs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DTAU + pid_bh.to(tl.int64) * T + offs_m, dtau, mask=row_ok)


@triton.jit
def _key_tile_heads(dk, dv, du, kt, vt, weight, allowed, frac, offs_m, row_ok, offs_d, Q, DO, LSE, DELTA, b, hk,
                    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, T, H_Q, GROUP, scale,
                    GATE: tl.constexpr, DOT: tl.constexpr, MASKED: tl.constexpr):
    """Add to the sums of a key tile (dk, dv [BLOCK_N, D], du [BLOCK_N]) its pairs with the queries offs_m, for
    every query head of KV head hk; frac marks the pairs whose mask is fractional (du). weight, allowed and
    frac are [BLOCK_N, queries] (keys as rows, see _bwd_tile). MASKED False: see _bwd_tile (weight, allowed
    and frac are None, du does not change)."""
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        bh = b * H_Q + hq
        q = tl.load(Q + b.to(tl.int64) * stride_qb + hq * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt
                    + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b.to(tl.int64) * stride_ob + hq * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot
                     + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        pw, ds, dm = _bwd_tile(q, do, kt, vt, weight, allowed, lse2, delta, scale, GATE, DOT, MASKED, True)
        dv += tl.dot(pw.to(do.dtype), do, input_precision=DOT)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT)
        if MASKED:
            du += tl.sum(tl.where(frac, dm, 0.0), 1)
    return dk, dv, du


@triton.jit
def _band_pass_tile(dk, dv, du, blk, kt, vt, u_j, start_j, end_j, offs_n, key_ok, offs_d, Q, DO, LSE, DELTA, TAU, b,
                    hk, pid_r, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, T, WINDOW, H_Q, GROUP,
                    scale, GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, LIST_BLOCK: tl.constexpr,
                    MASKED: tl.constexpr):
    """dk, dv, du of a key tile plus the pairs it forms with query tile blk, for every query head of its KV
    head. MASKED False: the query tile lies entirely before T, and the key tile inside the window of
    each of its queries (m = 1, no du)."""
    i0 = blk * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    if MASKED:
        l0 = (i0 // LIST_BLOCK) * LIST_BLOCK
        in_band = (offs_n > l0 - WINDOW) & (offs_n < i0 + BLOCK_M) & key_ok
        tau = tl.load(TAU + pid_r.to(tl.int64) * T + offs_m, mask=row_ok, other=float("-inf"))
        in_window = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] > offs_m[None, :] - WINDOW)
        selected = (start_j[:, None] <= offs_m[None, :]) & (offs_m[None, :] < end_j[:, None])
        allowed = row_ok[None, :] & in_band[:, None] & (in_window | selected)
        gap = u_j[:, None] - tau[None, :]
        weight = tl.where(in_window, 1.0, tl.minimum(tl.maximum(gap, 0.0), 1.0))
        frac = allowed & selected & (gap > 0.0) & (gap < 1.0)
    else:
        weight = None
        allowed = None
        frac = None
    return _key_tile_heads(dk, dv, du, kt, vt, weight, allowed, frac, offs_m, row_ok, offs_d, Q, DO, LSE, DELTA, b,
                           hk, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, T, H_Q, GROUP, scale,
                           GATE, DOT, MASKED)


@triton.jit
def sparsek_bwd_band_kernel(
    Q, K, V, U, TAU, START, END, DO, LSE, DELTA, DK_LIST, DV_LIST, DU_LIST, DK, DV, DU,
    q_strides, k_strides, v_strides, o_strides,
    T, N_BLOCKS, WINDOW, H_Q, GROUP, scale,
    GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    LIST_BLOCK: tl.constexpr,
):
    """dk, dv ([B, T, Hk, D] with the strides of k) and du ([R, T], float32): the band's sums plus, for keys in
    some block's list, the list pass's (DK_LIST, DV_LIST float32 like k, DU_LIST like du). N_BLOCKS query tiles
    of BLOCK_M; the band of a tile starts at that of its list block (LIST_BLOCK)."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    h_k = H_Q // GROUP
    b = pid_r // h_k
    hk = pid_r % h_k
    j0 = pid_n * BLOCK_N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T

    kv_offs = b.to(tl.int64) * stride_kb + hk * stride_kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    kt = tl.load(K + kv_offs, mask=key_ok[:, None], other=0.0)
    vt = tl.load(V + b.to(tl.int64) * stride_vb + hk * stride_vh + offs_n[:, None].to(tl.int64) * stride_vt
                 + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    u_j = tl.load(U + pid_r.to(tl.int64) * T + offs_n, mask=key_ok, other=0.0)
    start_j = tl.load(START + pid_r.to(tl.int64) * T + offs_n, mask=key_ok, other=0)
    end_j = tl.load(END + pid_r.to(tl.int64) * T + offs_n, mask=key_ok, other=0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    du = tl.zeros([BLOCK_N], dtype=tl.float32)

    # Query tiles whose band (l0 - w, i0 + BLOCK_M), l0 = the start of the tile's list block, meets this key tile.
    # Those (before T) whose every query has these keys in its window skip the mask.
    blk_lo = j0 // BLOCK_M
    blk_hi = tl.minimum(((j0 + BLOCK_N + WINDOW - 2) // LIST_BLOCK + 1) * (LIST_BLOCK // BLOCK_M), N_BLOCKS)
    full_lo, full_hi = _inner_run(blk_lo, blk_hi, tl.cdiv(j0 + BLOCK_N - 1, BLOCK_M),
                                  tl.minimum((j0 + WINDOW) // BLOCK_M, T // BLOCK_M), 1)
    for blk in range(blk_lo, full_lo):
        dk, dv, du = _band_pass_tile(dk, dv, du, blk, kt, vt, u_j, start_j, end_j, offs_n, key_ok, offs_d, Q, DO,
                                     LSE, DELTA, TAU, b, hk, pid_r, stride_qb, stride_qt, stride_qh, stride_ob,
                                     stride_ot, stride_oh, T, WINDOW, H_Q, GROUP, scale, GATE, DOT, BLOCK_M,
                                     LIST_BLOCK, True)
    for blk in range(full_lo, full_hi):
        dk, dv, du = _band_pass_tile(dk, dv, du, blk, kt, vt, u_j, start_j, end_j, offs_n, key_ok, offs_d, Q, DO,
                                     LSE, DELTA, TAU, b, hk, pid_r, stride_qb, stride_qt, stride_qh, stride_ob,
                                     stride_ot, stride_oh, T, WINDOW, H_Q, GROUP, scale, GATE, DOT, BLOCK_M,
                                     LIST_BLOCK, False)
    for blk in range(full_hi, blk_hi):
        dk, dv, du = _band_pass_tile(dk, dv, du, blk, kt, vt, u_j, start_j, end_j, offs_n, key_ok, offs_d, Q, DO,
                                     LSE, DELTA, TAU, b, hk, pid_r, stride_qb, stride_qt, stride_qh, stride_ob,
                                     stride_ot, stride_oh, T, WINDOW, H_Q, GROUP, scale, GATE, DOT, BLOCK_M,
                                     LIST_BLOCK, True)

    # Only the rows of keys in some list were written by the list pass.
    listed = key_ok & in_some_list(start_j, end_j, LIST_BLOCK)
    dk += tl.load(DK_LIST + kv_offs, mask=listed[:, None], other=0.0)
    dv += tl.load(DV_LIST + kv_offs, mask=listed[:, None], other=0.0)
    du += tl.load(DU_LIST + pid_r.to(tl.int64) * T + offs_n, mask=listed, other=0.0)
    tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DU + pid_r.to(tl.int64) * T + offs_n, du, mask=key_ok)


@triton.jit
def _flush_slots(DK, DV, DU, keys, dk, dv, du, flush, dkv_base, du_base, stride_kt, offs_d, ATOMIC: tl.constexpr):
    """Write the slots' sums to their keys' rows of the scratch dk, dv, du. Atomic adds (into zeros) only when
    several programs share a slot tile (a key's run of blocks may then be split between them)."""
    if tl.sum(flush.to(tl.int32), 0) > 0:
        rows = tl.where(flush, keys, 0).to(tl.int64)
        offs = dkv_base + rows[:, None] * stride_kt + offs_d[None, :]
        if ATOMIC:
            # Relaxed: nothing reads the scratch before the kernel ends. Triton's default (acq_rel) orders every
            # add with this thread's other memory accesses, which cost 3-5% of the backward at 32/8 on an H100.
            tl.atomic_add(DK + offs, dk, mask=flush[:, None], sem="relaxed")
            tl.atomic_add(DV + offs, dv, mask=flush[:, None], sem="relaxed")
            tl.atomic_add(DU + du_base + rows, du, mask=flush, sem="relaxed")
        else:
            tl.store(DK + offs, dk, mask=flush[:, None])
            tl.store(DV + offs, dv, mask=flush[:, None])
            tl.store(DU + du_base + rows, du, mask=flush)


@triton.jit
def sparsek_bwd_list_kernel(
    Q, K, V, U, TAU, END, LISTS, DO, LSE, DELTA, DK, DV, DU,
    q_strides, k_strides, v_strides, o_strides,
    T, N_SLOTS, N_BLOCKS, BLOCKS_PER_PROGRAM, WINDOW, H_Q, GROUP, scale,
    GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    SUB_M: tl.constexpr, ATOMIC: tl.constexpr, ONE_HEAD: tl.constexpr,
):
    """List-phase dk, dv, du of the keys in some block's list, into float32 scratch (dk, dv with the strides of
    k; du [R, T]); the band pass adds them. ONE_HEAD: GROUP == 1."""
    stride_qb, stride_qt, stride_qh = q_strides
    stride_kb, stride_kt, stride_kh = k_strides
    stride_vb, stride_vt, stride_vh = v_strides
    stride_ob, stride_ot, stride_oh = o_strides
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    h_k = H_Q // GROUP
    b = pid_r // h_k
    hk = pid_r % h_k
    offs_s = pid_s * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    slot_ok = offs_s < N_SLOTS
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    dkv_base = b.to(tl.int64) * stride_kb + hk * stride_kh
    du_base = pid_r.to(tl.int64) * T
    list_row = LISTS + pid_r.to(tl.int64) * N_BLOCKS * N_SLOTS

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    du = tl.zeros([BLOCK_N], dtype=tl.float32)
    held = tl.full([BLOCK_N], -1, dtype=tl.int32)      # the key each slot currently accumulates for

    blk_lo = pid_c * BLOCKS_PER_PROGRAM
    blk_hi = tl.minimum(blk_lo + BLOCKS_PER_PROGRAM, N_BLOCKS)
    # Blocks whose lists are still empty in this slot tile (see _listed_slots) are skipped. The blocks are
    # walked last first, so that the programs of a row, which start at different blocks, still walk the
    # same blocks at the same time (and share their q and dO in L2) until they stop.
    blk_lo = tl.maximum(blk_lo, tl.cdiv(pid_s * BLOCK_N + WINDOW, BLOCK_M))
    for step in range(0, blk_hi - blk_lo):
        blk = blk_hi - 1 - step
        keys = tl.load(list_row + blk * N_SLOTS + offs_s, mask=slot_ok, other=-1)
        changed = keys != held
        _flush_slots(DK, DV, DU, held, dk, dv, du, changed & (held >= 0), dkv_base, du_base, stride_kt, offs_d,
                     ATOMIC)
        dk = tl.where(changed[:, None], 0.0, dk)
        dv = tl.where(changed[:, None], 0.0, dv)
        du = tl.where(changed, 0.0, du)
        held = keys

        key_ok = keys >= 0
        keys64 = tl.where(key_ok, keys, 0).to(tl.int64)
        kt = tl.load(k_base + keys64[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        vt = tl.load(v_base + keys64[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        u_j = tl.load(U + du_base + keys64, mask=key_ok, other=0.0)
        end_j = tl.load(END + du_base + keys64, mask=key_ok, other=0)  # 0 for empty slots; end_j <= T

        # The block's queries in sub-tiles of SUB_M: a wide slot tile (many keys sharing each q / do load)
        # then still fits in registers.
        for sub in range(0, BLOCK_M, SUB_M):
            offs_m = blk * BLOCK_M + sub + tl.arange(0, SUB_M)
            row_ok = offs_m < T
            tau = tl.load(TAU + du_base + offs_m, mask=row_ok, other=float("-inf"))
            allowed = offs_m[None, :] < end_j[:, None]
            gap = u_j[:, None] - tau[None, :]
            weight = tl.minimum(tl.maximum(gap, 0.0), 1.0)
            # Pairs with a fractional mask, for du. Where not allowed p = 0, so dm = 0 and '& allowed' is not
            # needed; on an H100 it made the list pass 2% faster with GQA and 7% slower with one head per KV
            # head (register allocation, measured with 32-slot tiles; with the 128-slot tiles ptxas agrees: fewer
            # spills with it under GQA, fewer without it at one head per KV head), hence the flag, which changes
            # speed only.
            frac = (gap > 0.0) & (gap < 1.0)
            if not ONE_HEAD:
                frac = frac & allowed
            dk, dv, du = _key_tile_heads(dk, dv, du, kt, vt, weight, allowed, frac, offs_m, row_ok, offs_d, Q, DO, LSE,
                                         DELTA, b, hk, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
                                         T, H_Q, GROUP, scale, GATE, DOT, True)

    _flush_slots(DK, DV, DU, held, dk, dv, du, held >= 0, dkv_base, du_base, stride_kt, offs_d, ATOMIC)
