"""Triton kernels of one decode step over a SparseK KV cache: the cache update with its mask
(`cache_step_kernel`), then single-token attention (flash-decoding).

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
from ..sparsek.kernels import row_threshold


@triton.jit
def decode_fwd_kernel(
    Q, K, V, WEIGHT, ATTENDED, NONFINITE, OUT, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    N, H, GROUP, SPLIT_LEN, N_SPLITS, qk_scale2,
    GATE: tl.constexpr, DOT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    FINAL: tl.constexpr, FLAGGED: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Entries [s * SPLIT_LEN, (s + 1) * SPLIT_LEN) of one (batch row, KV head). FINAL (one split): the
    normalised output goes to OUT; otherwise the split's max, sum and accumulator go to the partials.
    FLAGGED: NONFINITE (uint8 [B * H], from cache_step_kernel) marks the rows whose new score was not finite;
    every output of such a row is NaN (BLOCK_H >= H)."""
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
    if FLAGGED:
        offs_h = tl.arange(0, BLOCK_H)
        flags = tl.load(NONFINITE + b.to(tl.int64) * H + offs_h, mask=offs_h < H, other=0)
        acc = tl.where(tl.max(flags, 0) != 0, float("nan"), acc)   # NaN survives the merge of the splits

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


@triton.jit
def cache_step_kernel(
    K_NEW, V_NEW, U_NEW, LENGTHS, KEYS, VALUES, SCORES, POSITIONS, KEPT, DROPPED, TAU_HINT, WEIGHT, ATTENDED,
    NONFINITE,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_unb, stride_unh,
    H, C, WINDOW, TOPK,
    NEWTON_ITERS: tl.constexpr, MAX_ITERS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TOPK: tl.constexpr,
):
    """One decode step of one (batch row, KV head) of a SparseKCache, as `SparseKCache._append` then `weights`:
    the new token enters the window ring; the token leaving it (or the new one, without a window) becomes a
    candidate: its score enters the kept buffer if it beats the lowest (the first lowest column), else counts
    as dropped, and its key takes the worst slot if it is at least as good (worst: lowest score, then oldest;
    empty slots first). Then tau of the kept scores, and the mask of every entry: WEIGHT (float32: 1 in the
    window, clip(u - tau, 0, 1) in the slots) and ATTENDED (uint8: the entry holds a token). A non-finite new
    score enters as -inf, as `SparseKCache.step` does on the host, and NONFINITE (uint8) flags it.

    Cache tensors are contiguous: KEYS, VALUES [B * H, N, D], SCORES, POSITIONS (int64) [B * H, N], KEPT
    (float64) [B * H, C], DROPPED and TAU_HINT (float64) [B * H]; LENGTHS (int64) [B] is read, not advanced
    (the host adds 1 after the launch: every head of a row reads it). U_NEW may be wider than SCORES. TAU_HINT
    holds the kept scores' last tau, the threshold search's first probe (see row_threshold).
    """
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    n_entries = WINDOW + TOPK
    t = tl.load(LENGTHS + b)
    offs_d = tl.arange(0, HEAD_DIM)
    entry_row = pid.to(tl.int64) * n_entries
    key_row = KEYS + entry_row * HEAD_DIM
    value_row = VALUES + entry_row * HEAD_DIM
    k_new = tl.load(K_NEW + b.to(tl.int64) * stride_knb + h.to(tl.int64) * stride_knh + offs_d)
    v_new = tl.load(V_NEW + b.to(tl.int64) * stride_vnb + h.to(tl.int64) * stride_vnh + offs_d)
    u_in = tl.load(U_NEW + b.to(tl.int64) * stride_unb + h.to(tl.int64) * stride_unh)
    finite = tl.abs(u_in) < float("inf")                 # false for NaN and +-inf
    tl.store(NONFINITE + pid, (finite == 0).to(tl.uint8))
    u_new = tl.where(finite, u_in, float("-inf")).to(SCORES.dtype.element_ty)   # checked, then rounded

    if HAS_WINDOW:
        ring = t % WINDOW                                # the token at t - WINDOW, if any, leaves from here
        cand_k = tl.load(key_row + ring * HEAD_DIM + offs_d)
        cand_v = tl.load(value_row + ring * HEAD_DIM + offs_d)
        cand_u = tl.load(SCORES + entry_row + ring)
        present = t >= WINDOW
        cand_pos = t - WINDOW
        tl.debug_barrier()                               # every thread has read the leaving token
        tl.store(key_row + ring * HEAD_DIM + offs_d, k_new)
        tl.store(value_row + ring * HEAD_DIM + offs_d, v_new)
        tl.store(SCORES + entry_row + ring, u_new)
        tl.store(POSITIONS + entry_row + ring, t)
    else:
        cand_k, cand_v, cand_u = k_new, v_new, u_new
        present = t >= 0
        cand_pos = t

    tau = float("-inf")
    if HAS_TOPK:
        # The kept buffer: the candidate replaces the first lowest score if it beats it. Its finite scores fill
        # a prefix of the columns, at most one per candidate so far (see SparseKCache), so the scans below stop
        # after the first min(C, candidates including this one) columns; at least one, which holds the lowest.
        kept_row = KEPT + pid.to(tl.int64) * C
        n_live = tl.minimum(tl.maximum(t + 1 - WINDOW, 1), C).to(tl.int32)
        # Each lane keeps its lowest score and that score's first column; two reductions after the loop (not two
        # per chunk) then give the first lowest column.
        offs_c = tl.arange(0, BLOCK_C)
        lane_min = tl.full([BLOCK_C], float("inf"), tl.float64)
        lane_at = tl.zeros([BLOCK_C], tl.int32)          # in range even if no score is below +inf
        for c0 in range(0, n_live, BLOCK_C):
            z = tl.load(kept_row + c0 + offs_c, mask=c0 + offs_c < n_live, other=float("inf"))
            lower = z < lane_min                         # strict: a lane's later equal score does not move it
            lane_at = tl.where(lower, c0 + offs_c, lane_at)
            lane_min = tl.where(lower, z, lane_min)
        lowest = tl.min(lane_min, 0)
        column = tl.min(tl.where(lane_min == lowest, lane_at, C), 0)
        u_kept = tl.where(present, cand_u.to(tl.float64), float("-inf"))
        enters = u_kept > lowest
        tl.debug_barrier()                               # every warp has read the buffer before one writes it
        tl.store(kept_row + column, tl.where(enters, u_kept, lowest))
        dropped = tl.load(DROPPED + pid)
        tl.store(DROPPED + pid, tl.maximum(dropped, tl.where(enters, lowest, u_kept)))

        # The slots: the candidate takes the worst one if it is at least as good (ties to the newer key).
        slot_u = SCORES + entry_row + WINDOW
        slot_pos = POSITIONS + entry_row + WINDOW
        # Among the lowest scores, the oldest slot, and the first of the empty ones: one int64 key per slot,
        # (position + 1) * TOPK + slot, orders both at once (positions are distinct, empty slots hold -1).
        offs_k = tl.arange(0, BLOCK_K)
        worst_u = tl.min(tl.full([BLOCK_K], float("inf"), SCORES.dtype.element_ty), 0)
        worst_key = tl.min(tl.full([BLOCK_K], 9223372036854775807, tl.int64), 0)
        for s0 in range(0, TOPK, BLOCK_K):
            s_ok = s0 + offs_k < TOPK
            u = tl.load(slot_u + s0 + offs_k, mask=s_ok, other=0.0)
            p = tl.load(slot_pos + s0 + offs_k, mask=s_ok, other=-1)
            live_u = tl.where(s_ok, tl.where(p >= 0, u, float("-inf")), float("inf"))
            u_min = tl.min(live_u, 0)
            key = tl.min(tl.where(live_u == u_min, (p + 1) * TOPK + s0 + offs_k, 9223372036854775807), 0)
            worse = (u_min < worst_u) | ((u_min == worst_u) & (key < worst_key))
            worst_key = tl.where(worse, key, worst_key)
            worst_u = tl.where(worse, u_min, worst_u)
        worst = worst_key % TOPK                         # the key is >= 0 whenever a slot exists (TOPK >= 1)
        tl.debug_barrier()                               # every warp has read the slots before they change
        filling = cand_pos < TOPK                        # while the slots fill, candidate j takes slot j
        slot = tl.where(filling, cand_pos, worst)
        take = present & (filling | (cand_u >= worst_u))
        entry = WINDOW + slot
        take_d = (offs_d * 0 + take.to(tl.int32)) != 0   # a vector mask (the interpreter refuses scalar & vector)
        tl.store(key_row + entry * HEAD_DIM + offs_d, cand_k, mask=take_d)
        tl.store(value_row + entry * HEAD_DIM + offs_d, cand_v, mask=take_d)
        tl.store(SCORES + entry_row + entry, cand_u, mask=take)
        tl.store(POSITIONS + entry_row + entry, cand_pos, mask=take)
        tl.debug_barrier()                               # the kept buffer and the slots are written

        # The kept scores' tau never falls from one step to the next (a step adds a score or replaces the
        # lowest with a higher one), so the last step's is a close first probe.
        tau = row_threshold(kept_row, n_live, TOPK, tl.load(TAU_HINT + pid), NEWTON_ITERS, MAX_ITERS, BLOCK_C,
                            HINTED=True)
        tl.store(TAU_HINT + pid, tau)
        tau = tl.where(t + 1 - WINDOW > TOPK, tau, float("-inf"))   # at most k candidates: every one weighs 1
    else:
        tl.debug_barrier()

    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, n_entries, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < n_entries
        u = tl.load(SCORES + entry_row + n, mask=n_ok, other=0.0).to(tl.float64)
        p = tl.load(POSITIONS + entry_row + n, mask=n_ok, other=-1)
        gap = tl.where(tau > float("-inf"), tl.minimum(tl.maximum(u - tau, 0.0), 1.0), 1.0)
        tl.store(WEIGHT + entry_row + n, tl.where(n < WINDOW, 1.0, gap).to(tl.float32), mask=n_ok)
        tl.store(ATTENDED + entry_row + n, (p >= 0).to(tl.uint8), mask=n_ok)
