"""Triton kernels of the selection: wavelet-matrix levels, the threshold descent, and block key lists.

Shape legend: R selection rows, L = T - window candidate positions per row, M = 3R wavelet rows (the p-rank,
q-rank and best-first-rank sequences of every row, stacked), NB query blocks, K slots.

The algorithm is the one of prefix.py (read it first); here it is split for a GPU:
  * breakpoint_ranks_kernel and keys_by_rank_kernel turn one sort of the scores into the three rank sequences
    (and the breakpoints in order) that the wavelet matrices are built over.
  * wavelet_write_kernel builds one level of all M wavelet matrices: a segment of a row per program, writing
    prefix counts (zeros_before, and for the p and q rows the weight of the ones before each position), the
    stably partitioned sequence of the next level and that level's per-segment counts, which the next launch
    needs before it can start (wavelet_count_kernel counts the first level). Every level is kept, so the
    descent needs no state in memory between levels.
  * prefix_descend_kernel walks all levels for every prefix length at once: the threshold descent over the
    p / q matrices and two k-th-smallest descents over the rank matrix (the k-th and (k+1)-th best).
  * finish_tau_kernel and running_max_kernel finish the thresholds; key_ranges_kernel finds every key's range.
  * fractional_ranges_kernel, fractional_shares_kernel, share_prefix_kernel and add_threshold_grad_kernel are
    prefix.threshold_backward: the gradient of the scores through the thresholds, in the attention's backward.
  * evictions_kernel, slot_parents_kernel and follow_parents_kernel find every key's slot
    (blocks.selection_slots) by pointer jumping; slot_entries_kernel
    and fill_lists_kernel write each query block's slot array (see blocks.py): every key marks the first
    block it is present in, then a running maximum down the blocks fills the rest.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _first_past(ROW, base, x, n, inside, SHIFT: tl.constexpr, OR_EQUAL: tl.constexpr, ASCENDING: tl.constexpr,
                STEPS):
    """Per x: the first index m of the sorted row ROW[base : base + n] where ROW[m] - SHIFT has passed x: < x in
    a descending row, > x in an ascending one (<=, >= with OR_EQUAL); n if none. A binary search of
    STEPS >= bit_length(n) halvings, compared in the dtype of x."""
    lo = tl.zeros(x.shape, dtype=tl.int32)
    hi = lo + n
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        s = tl.load(ROW + base + mid, mask=inside & active, other=0.0).to(x.dtype) - SHIFT
        if ASCENDING:                         # mirror the row: an ascending row passes x where -ROW passes -x
            s, y = -s, -x
        else:
            y = x
        if OR_EQUAL:
            below = s <= y
        else:
            below = s < y
        lo = tl.where(active & ~below, mid + 1, lo)
        hi = tl.where(active & below, mid, hi)
    return lo


@triton.jit
def breakpoint_ranks_kernel(DESC, BY_RANK, BREAKS, SORTED_RANKS, VALS, R, N, STEPS, CHUNK: tl.constexpr):
    """The breakpoints in order and the ranks of every key, from one sort of each row of scores: DESC [R, N]
    float64, the scores best first, and BY_RANK [R, N] int64, their positions (prefix._best_first's order).

    The breakpoints u_j and u_j - 1 in the order of prefix.py's stable sort of [u, u - 1] (ties: every u before
    every u - 1, then by position) -> BREAKS [R, 2N]. Subtracting 1 keeps the order of the sorted scores, so
    that order is a merge of the sorted scores with themselves minus 1: an entry's rank is its index in its
    half plus a binary-searched count in the other (subtracting 1 merges two distinct float64 scores only
    beyond 2^53). The ranks of u and u - 1 go to SORTED_RANKS [R, 2, N] int32 in best-first order, and
    keys_by_rank_kernel puts them in key order (scattering them and the weights by key from here took four
    times as long on an H100); each key's best-first rank goes to row 2R + r of VALS [3R, N] int32."""
    row = tl.program_id(0)
    rank = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)          # best-first rank
    inside = rank < N
    base = row.to(tl.int64) * N
    score = tl.load(DESC + base + rank, mask=inside, other=0.0)
    ascending = N - 1 - rank                                        # index among the sorted scores, ascending
    shifted = score - 1.0
    rank_p = ascending + N - _first_past(DESC, base, score, N, inside, 1.0, False, False, STEPS)
    rank_q = ascending + N - _first_past(DESC, base, shifted, N, inside, 0.0, True, False, STEPS)
    tl.store(BREAKS + 2 * base + rank_p, score, mask=inside)
    tl.store(BREAKS + 2 * base + rank_q, shifted, mask=inside)
    tl.store(SORTED_RANKS + 2 * base + rank, rank_p, mask=inside)
    tl.store(SORTED_RANKS + 2 * base + N + rank, rank_q, mask=inside)
    key = tl.load(BY_RANK + base + rank, mask=inside, other=0)
    tl.store(VALS + (row + 2 * R).to(tl.int64) * N + key, rank, mask=inside)


@triton.jit
def keys_by_rank_kernel(U, SORTED_RANKS, VALS, WEIGHTS, R, N, CHUNK: tl.constexpr):
    """The wavelet rows in key order, after breakpoint_ranks_kernel: VALS rows r and R + r <- the ranks of u_j
    and u_j - 1 (gathered from SORTED_RANKS by j's best-first rank, VALS row 2R + r), WEIGHTS [2R, N] float64
    rows r and R + r <- u_j (U [R, N] float64)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    inside = offs < N
    base = row.to(tl.int64) * N
    rank = tl.load(VALS + (row + 2 * R).to(tl.int64) * N + offs, mask=inside, other=0)
    rank_p = tl.load(SORTED_RANKS + 2 * base + rank, mask=inside, other=0)
    rank_q = tl.load(SORTED_RANKS + 2 * base + N + rank, mask=inside, other=0)
    score = tl.load(U + base + offs, mask=inside, other=0.0)
    tl.store(VALS + base + offs, rank_p, mask=inside)
    tl.store(VALS + (row + R).to(tl.int64) * N + offs, rank_q, mask=inside)
    tl.store(WEIGHTS + base + offs, score, mask=inside)
    tl.store(WEIGHTS + (row + R).to(tl.int64) * N + offs, score, mask=inside)


@triton.jit
def _level_chunk(VALS, W, base, w_base, c0, hi, w_len, shift, CHUNK: tl.constexpr):
    """Entries [c0, c0 + CHUNK) of a row (below hi) at one level: offsets, in-range mask, values, weights (of
    the first w_len entries: 0 for rows without weights), the level's bit, and per entry 1 for a zero bit and
    the weight of a one bit (0 outside the range)."""
    offs = c0 + tl.arange(0, CHUNK)
    inside = offs < hi
    vals = tl.load(VALS + base + offs, mask=inside, other=0)
    weight = tl.load(W + w_base + offs, mask=inside & (offs < w_len), other=0.0)
    bit = (vals >> shift) & 1
    is_zero = tl.where(inside & (bit == 0), 1, 0)
    one_weight = tl.where(bit == 1, weight, 0.0)
    return offs, inside, vals, weight, bit, is_zero, one_weight


@triton.jit
def _row_bases(row, N, N_WEIGHTED):
    """Offsets of a row in the [M, N] values and the [M_W, N] weights (clamped for rows without weights, whose
    weight accesses are all masked), and the row's weighted length: N, or 0 without weights."""
    return row.to(tl.int64) * N, tl.minimum(row, N_WEIGHTED - 1).to(tl.int64) * N, tl.where(row < N_WEIGHTED, N, 0)


@triton.jit
def wavelet_count_kernel(VALS, W, PART_SEG, PART_ZEROS, PART_WEIGHT, N, N_WEIGHTED, SEG_LEN, N_SEG, shift,
                         CHUNK: tl.constexpr):
    """The first level's parts (see wavelet_write_kernel): part 0 of each segment holds its zeros of bit
    `shift` and the weight of its ones, parts 1-3 are empty. -> PART_SEG, PART_ZEROS, PART_WEIGHT [M, 4 N_SEG]."""
    row = tl.program_id(0)
    seg = tl.program_id(1)
    base, w_base, w_len = _row_bases(row, N, N_WEIGHTED)
    lo = seg * SEG_LEN
    hi = tl.minimum(lo + SEG_LEN, N)
    n_zeros = tl.zeros([CHUNK], dtype=tl.int32)
    ones_weight = tl.zeros([CHUNK], dtype=tl.float64)
    for c0 in range(lo, hi, CHUNK):
        _, _, _, _, _, is_zero, one_weight = _level_chunk(VALS, W, base, w_base, c0, hi, w_len, shift, CHUNK)
        n_zeros += is_zero
        ones_weight += one_weight
    parts = tl.arange(0, 4)
    out = (row * N_SEG + seg) * 4 + parts
    tl.store(PART_SEG + out, seg + parts * 0)
    tl.store(PART_ZEROS + out, tl.where(parts == 0, tl.sum(n_zeros, 0), 0))
    tl.store(PART_WEIGHT + out, tl.where(parts == 0, tl.sum(ones_weight, 0), 0.0))


@triton.jit
def wavelet_write_kernel(VALS, W, NEXT_VALS, NEXT_W, ZEROS_BEFORE, ONES_WEIGHT_BEFORE, PART_SEG, PART_ZEROS,
                         PART_WEIGHT, NEXT_PART_SEG, NEXT_PART_ZEROS, NEXT_PART_WEIGHT, N, N_WEIGHTED, SEG_LEN, N_SEG,
                         shift, CHUNK: tl.constexpr, PARTS_POW2: tl.constexpr):
    """One level: prefix counts of this level (ZEROS_BEFORE [M, N + 1], ONES_WEIGHT_BEFORE [M_W, N + 1]) and
    the partitioned sequence of the next, plus the next level's parts, so that no extra pass has to count it.

    A segment's zeros land in one run of the next level and its ones in another; each run, no longer than a
    segment, covers at most two of the next level's segments. Those four pieces are the segment's parts: for
    each, the segment of the next level it lies in (PART_SEG), its zeros of the next bit (PART_ZEROS) and the
    weight of its ones (PART_WEIGHT), [M, 4 N_SEG]. A segment's prefix counts are the sums over the parts that
    lie in earlier segments, summed in a fixed order (no atomics), so the float64 sums are reproducible.
    """
    row = tl.program_id(0)
    seg = tl.program_id(1)
    base, w_base, w_len = _row_bases(row, N, N_WEIGHTED)
    prefix_base = base + row                          # rows of N + 1 prefix counts
    w_prefix_base = w_base + tl.minimum(row, N_WEIGHTED - 1)
    parts = tl.arange(0, PARTS_POW2)
    part_ok = parts < 4 * N_SEG
    part_seg = tl.load(PART_SEG + row * N_SEG * 4 + parts, mask=part_ok, other=N_SEG)
    part_zeros = tl.load(PART_ZEROS + row * N_SEG * 4 + parts, mask=part_ok, other=0)
    part_weight = tl.load(PART_WEIGHT + row * N_SEG * 4 + parts, mask=part_ok, other=0.0)
    zeros_before = tl.sum(tl.where(part_seg < seg, part_zeros, 0), 0)
    weight_before = tl.sum(tl.where(part_seg < seg, part_weight, 0.0), 0)
    total_zeros = tl.sum(part_zeros, 0)

    lo = seg * SEG_LEN
    hi = tl.minimum(lo + SEG_LEN, N)
    # The next level's segments where this segment's zero run and one run begin.
    zero_run_seg = zeros_before // SEG_LEN
    one_run_seg = (total_zeros + lo - zeros_before) // SEG_LEN
    quarter = tl.arange(0, 4)
    next_zeros = tl.zeros([4], dtype=tl.int32)
    next_weight = tl.zeros([4], dtype=tl.float64)
    next_shift = tl.maximum(shift - 1, 0)             # unused at the last level (shift 0)
    for c0 in range(lo, hi, CHUNK):
        offs, inside, vals, weight, bit, is_zero, one_weight = _level_chunk(VALS, W, base, w_base, c0, hi, w_len,
                                                                           shift, CHUNK)
        z_before = zeros_before + tl.cumsum(is_zero, 0) - is_zero
        w_before = weight_before + tl.cumsum(one_weight, 0) - one_weight
        tl.store(ZEROS_BEFORE + prefix_base + offs, z_before, mask=inside)
        tl.store(ONES_WEIGHT_BEFORE + w_prefix_base + offs, w_before, mask=inside & (offs < w_len))
        dest = tl.where(bit == 0, z_before, total_zeros + offs - z_before)
        tl.store(NEXT_VALS + base + dest, vals, mask=inside)
        tl.store(NEXT_W + w_base + dest, weight, mask=inside & (offs < w_len))
        part = 2 * bit + dest // SEG_LEN - tl.where(bit == 0, zero_run_seg, one_run_seg)
        next_bit = (vals >> next_shift) & 1
        in_part = part[:, None] == quarter[None, :]
        next_zeros += tl.sum(tl.where(in_part & (inside & (next_bit == 0))[:, None], 1, 0), 0)
        next_weight += tl.sum(tl.where(in_part & (next_bit == 1)[:, None], weight[:, None], 0.0), 0)
        zeros_before += tl.sum(is_zero, 0)
        weight_before += tl.sum(one_weight, 0)
    if shift > 0:
        out = (row * N_SEG + seg) * 4 + quarter
        tl.store(NEXT_PART_SEG + out, tl.where(quarter < 2, zero_run_seg, one_run_seg) + quarter % 2)
        tl.store(NEXT_PART_ZEROS + out, next_zeros)
        tl.store(NEXT_PART_WEIGHT + out, next_weight)
    if seg == N_SEG - 1:
        tl.store(ZEROS_BEFORE + prefix_base + N, total_zeros)
        if w_len > 0:
            tl.store(ONES_WEIGHT_BEFORE + w_prefix_base + N, weight_before)


@triton.jit
def finish_tau_kernel(U, BY_RANK, KTH, KTH_NEXT, TAU, CHUNK_MAX, N, N_CHUNKS, topk, CHUNK: tl.constexpr):
    """The threshold of every prefix length before its running maximum, finished as prefix.py does: where the
    topk-th and (topk+1)-th best keys (u theta, below) are 1 or more apart the threshold is flat and takes the
    midpoint, else the descent's tau (at least theta - 1); prefixes of at most topk candidates have none (-inf).
    U [R, N] float64, BY_RANK [R, N] int64, KTH, KTH_NEXT [R, N] int32; TAU [R, N] float64, the descent's
    threshold, finished in place; the maximum of each chunk -> CHUNK_MAX [R, N_CHUNKS]."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    inside = offs < N
    base = row.to(tl.int64) * N
    kth = tl.minimum(tl.load(KTH + base + offs, mask=inside, other=0), N - 1)
    kth_next = tl.minimum(tl.load(KTH_NEXT + base + offs, mask=inside, other=0), N - 1)
    theta = tl.load(U + base + tl.load(BY_RANK + base + kth, mask=inside, other=0), mask=inside, other=0.0)
    below = tl.load(U + base + tl.load(BY_RANK + base + kth_next, mask=inside, other=0), mask=inside, other=0.0)
    tau_raw = tl.load(TAU + base + offs, mask=inside, other=0.0)
    tau = tl.where(theta - below >= 1, 0.5 * (below + theta - 1), tl.maximum(tau_raw, theta - 1))
    tau = tl.where(inside & (offs + 1 > topk), tau, float("-inf"))
    tl.store(TAU + base + offs, tau, mask=inside)
    tl.store(CHUNK_MAX + row * N_CHUNKS + chunk, tl.max(tau, 0))


@triton.jit
def key_ranges_kernel(KTH, RANK_BEST, START, END, N, T, WINDOW, topk, STEPS, CHUNK: tl.constexpr):
    """Every key's selection range [START, END) [R, T] int64 (prefix.key_ranges): start_j = min(j + w, T), and a
    candidate (j < N) leaves the top-k at the first prefix whose topk-th best ranks above it (that rank only
    improves, so a binary search of STEPS >= bit_length(N) halvings finds it): end_j = min(max(that prefix,
    j) + w, T). KTH [R, N] int32: best-first rank of the topk-th best key of each prefix; RANK_BEST [R, N]
    int32: each key's best-first rank."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    inside = offs < T
    candidate = inside & (offs < N)
    base = row.to(tl.int64) * N
    rank = tl.load(RANK_BEST + base + offs, mask=candidate, other=0)
    lo = tl.zeros([CHUNK], dtype=tl.int32)        # prefix lengths lo + 1: the first with a better topk-th best
    hi = lo + N
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        kth = tl.load(KTH + base + mid, mask=candidate & active, other=0)
        beaten = (mid + 1 >= topk) & (kth < rank)   # no eviction before topk candidates
        lo = tl.where(active & ~beaten, mid + 1, lo)
        hi = tl.where(active & beaten, mid, hi)
    start = tl.minimum(offs + WINDOW, T)
    end = tl.where(candidate, tl.minimum(tl.maximum(lo, offs) + WINDOW, T), start)
    out = row.to(tl.int64) * T + offs
    tl.store(START + out, start.to(tl.int64), mask=inside)
    tl.store(END + out, end.to(tl.int64), mask=inside)


@triton.jit
def running_max_kernel(X, CHUNK_MAX, OUT, N, N_CHUNKS, out_row_stride, CHUNK: tl.constexpr,
                       CHUNKS_POW2: tl.constexpr):
    """OUT[r, i] = max(X[r, :i + 1]) for X [R, N] (values only, unlike torch.cummax), from the chunk maxima
    of finish_tau_kernel. OUT rows are out_row_stride apart. (A NaN threshold, from a NaN score, may be
    dropped by the maximum on a GPU; the attention's poison marks such calls anyway.)"""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.arange(0, CHUNKS_POW2)
    before = tl.load(CHUNK_MAX + row * N_CHUNKS + chunks, mask=chunks < chunk, other=float("-inf"))
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    inside = offs < N
    x = tl.load(X + row.to(tl.int64) * N + offs, mask=inside, other=float("-inf"))
    running = tl.maximum(tl.associative_scan(x, 0, _max_combine), tl.max(before, 0))
    tl.store(OUT + row.to(tl.int64) * out_row_stride + offs, running, mask=inside)


@triton.jit
def fractional_ranges_kernel(U, TAU, LO, HI, COVER, CHUNK_COVER, T, WINDOW, N_SCAN, STEPS, SCAN: tl.constexpr,
                             CHUNK: tl.constexpr):
    """The first half of prefix.threshold_backward: for every key l the queries [lo_l, hi_l) for which it is a
    fractional candidate (i >= l + w and tau_i < u_l < tau_i + 1), by binary searches in the non-decreasing
    thresholds, compared in float64 as there. U, TAU [R, T] float32; LO, HI [R, T] int32. Each non-empty range
    adds +1 at lo and -1 at hi to COVER [R, T + 1] int32 and to the totals of its scan chunks (SCAN queries)
    CHUNK_COVER [R, N_SCAN + 1] int32, both zeroed before (integer atomics: the sums do not depend on order)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    inside = offs < T
    base = row.to(tl.int64) * T
    u = tl.load(U + base + offs, mask=inside, other=0.0).to(tl.float64)
    below_u = _first_past(TAU, base, u, T, inside, 0.0, True, True, STEPS)             # tau_i < u_l
    lo = _first_past(TAU, base, u - 1.0, T, inside, 0.0, False, True, STEPS)          # tau_i > u_l - 1
    lo = tl.minimum(tl.maximum(lo, offs + WINDOW), T)
    hi = tl.maximum(below_u, lo)
    tl.store(LO + base + offs, lo, mask=inside)
    tl.store(HI + base + offs, hi, mask=inside)
    fractional = inside & (lo < hi)
    ones = tl.full([CHUNK], 1, dtype=tl.int32)
    cover_row = COVER + row.to(tl.int64) * (T + 1)
    tl.atomic_add(cover_row + lo, ones, mask=fractional)
    tl.atomic_add(cover_row + hi, -ones, mask=fractional)
    chunk_row = CHUNK_COVER + row * (N_SCAN + 1)
    tl.atomic_add(chunk_row + lo // SCAN, ones, mask=fractional)
    tl.atomic_add(chunk_row + hi // SCAN, -ones, mask=fractional)


@triton.jit
def fractional_shares_kernel(COVER, CHUNK_COVER, GRAD_TAU, SHARE, CHUNK_SHARE, T, N_SCAN, GROUP,
                             SCAN: tl.constexpr, SCANS_POW2: tl.constexpr):
    """Each query's share of its threshold's gradient, grad_tau_i / |F_i| (0 where F_i is empty), float64 ->
    SHARE [R, T], and the share total of each scan chunk -> CHUNK_SHARE [R, N_SCAN]. |F_i| is the running sum
    of COVER (from fractional_ranges_kernel). GRAD_TAU [R * GROUP, T] float32: the GROUP query heads of a row
    are summed."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.arange(0, SCANS_POW2)
    before = tl.sum(tl.load(CHUNK_COVER + row * (N_SCAN + 1) + chunks, mask=chunks < chunk, other=0), 0)
    offs = chunk * SCAN + tl.arange(0, SCAN)
    inside = offs < T
    n_frac = tl.cumsum(tl.load(COVER + row.to(tl.int64) * (T + 1) + offs, mask=inside, other=0), 0) + before
    grad = tl.zeros([SCAN], dtype=tl.float64)
    for g in range(0, GROUP):
        grad += tl.load(GRAD_TAU + (row * GROUP + g).to(tl.int64) * T + offs, mask=inside, other=0.0).to(tl.float64)
    share = tl.where(n_frac > 0, grad / tl.maximum(n_frac, 1).to(tl.float64), 0.0)
    tl.store(SHARE + row.to(tl.int64) * T + offs, share, mask=inside)
    tl.store(CHUNK_SHARE + row * N_SCAN + chunk, tl.sum(share, 0))


@triton.jit
def share_prefix_kernel(SHARE, CHUNK_SHARE, SHARE_BEFORE, T, N_SCAN, SCAN: tl.constexpr, SCANS_POW2: tl.constexpr):
    """SHARE_BEFORE [R, T + 1] float64: the sum of the shares of the queries before each position (0 first)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.arange(0, SCANS_POW2)
    before = tl.sum(tl.load(CHUNK_SHARE + row * N_SCAN + chunks, mask=chunks < chunk, other=0.0), 0)
    offs = chunk * SCAN + tl.arange(0, SCAN)
    inside = offs < T
    out_row = SHARE_BEFORE + row.to(tl.int64) * (T + 1)
    running = tl.cumsum(tl.load(SHARE + row.to(tl.int64) * T + offs, mask=inside, other=0.0), 0) + before
    tl.store(out_row + offs + 1, running, mask=inside)
    tl.store(out_row, 0.0, mask=chunk == 0)


@triton.jit
def add_threshold_grad_kernel(SHARE_BEFORE, LO, HI, DU, T, CHUNK: tl.constexpr):
    """DU [R, T] float32 += the gradient through the thresholds: key l gets the shares of the queries
    [lo_l, hi_l), a difference of two prefix sums."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    inside = offs < T
    base = row.to(tl.int64) * T
    lo = tl.load(LO + base + offs, mask=inside, other=0)
    hi = tl.load(HI + base + offs, mask=inside, other=0)
    prefix_row = SHARE_BEFORE + row.to(tl.int64) * (T + 1)
    grad = tl.load(prefix_row + hi, mask=inside, other=0.0) - tl.load(prefix_row + lo, mask=inside, other=0.0)
    du = tl.load(DU + base + offs, mask=inside, other=0.0)
    tl.store(DU + base + offs, du + grad.to(tl.float32), mask=inside)


@triton.jit
def _kth_step(zeros_before, n_zeros, lo, hi, rank, answer):
    """One level of a k-th smallest descent on the range [lo, hi)."""
    z_lo = tl.load(zeros_before + lo)
    z_hi = tl.load(zeros_before + hi)
    zeros = z_hi - z_lo
    go_ones = rank > zeros
    rank = tl.where(go_ones, rank - zeros, rank)
    lo = tl.where(go_ones, n_zeros + lo - z_lo, z_lo)
    hi = tl.where(go_ones, n_zeros + hi - z_hi, z_hi)
    return lo, hi, rank, 2 * answer + go_ones.to(tl.int32)


@triton.jit
def prefix_descend_kernel(ZEROS_BEFORE, ONES_WEIGHT_BEFORE, BREAKS, TAU, KTH, KTH_NEXT,
                          R, N, N_BREAKS, NBITS, LEVEL_STRIDE, WEIGHT_LEVEL_STRIDE, topk, BLOCK: tl.constexpr):
    """For every prefix length c = 1..N of row r: the closed-form tau of the last breakpoint with
    f_c >= topk (TAU), and the best-first ranks of the topk-th and (topk+1)-th best keys (KTH, KTH_NEXT).
    ZEROS_BEFORE [NBITS, 3R, N + 1] and ONES_WEIGHT_BEFORE [NBITS, 2R, N + 1] (the rank rows have no weights)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    prefix_len = tl.where(inside, offs + 1, 0)
    p_row = row.to(tl.int64) * (N + 1)      # the p, q and rank matrices of this row are rows r, R + r, 2R + r
    q_row = (row + R).to(tl.int64) * (N + 1)
    r_row = (row + 2 * R).to(tl.int64) * (N + 1)

    lo_p = tl.zeros([BLOCK], dtype=tl.int32)
    hi_p = prefix_len
    lo_q = lo_p
    hi_q = prefix_len
    node = lo_p
    n_p = lo_p                                   # counts of p / q ranks at or above the current node's end
    n_q = lo_p
    s_p = tl.zeros([BLOCK], dtype=tl.float64)    # and the sums of u over them
    s_q = s_p
    lo_1 = lo_p
    hi_1 = prefix_len
    rank_1 = tl.zeros([BLOCK], dtype=tl.int32) + topk
    ans_1 = lo_p
    lo_2 = lo_p
    hi_2 = prefix_len
    rank_2 = rank_1 + 1
    ans_2 = lo_p
    zb = ZEROS_BEFORE          # advanced by a pointer step per level: level * LEVEL_STRIDE could overflow int32
    wb = ONES_WEIGHT_BEFORE
    for level in range(NBITS):
        half = 1 << (NBITS - 1 - level)
        zp_lo = tl.load(zb + p_row + lo_p)
        zp_hi = tl.load(zb + p_row + hi_p)
        zq_lo = tl.load(zb + q_row + lo_q)
        zq_hi = tl.load(zb + q_row + hi_q)
        up_n_p = n_p + (hi_p - lo_p) - (zp_hi - zp_lo)
        up_n_q = n_q + (hi_q - lo_q) - (zq_hi - zq_lo)
        up_s_p = s_p + tl.load(wb + p_row + hi_p) - tl.load(wb + p_row + lo_p)
        up_s_q = s_q + tl.load(wb + q_row + hi_q) - tl.load(wb + q_row + lo_q)
        mid = node + half
        t = tl.load(BREAKS + row.to(tl.int64) * N_BREAKS + tl.minimum(mid, N_BREAKS - 1))
        f_mid = up_n_q + (up_s_p - up_s_q) - t * (up_n_p - up_n_q)
        go_up = (f_mid >= topk) & (mid < N_BREAKS)
        node = tl.where(go_up, mid, node)
        n_p = tl.where(go_up, n_p, up_n_p)
        n_q = tl.where(go_up, n_q, up_n_q)
        s_p = tl.where(go_up, s_p, up_s_p)
        s_q = tl.where(go_up, s_q, up_s_q)
        nz_p = tl.load(zb + p_row + N)
        nz_q = tl.load(zb + q_row + N)
        lo_p = tl.where(go_up, nz_p + lo_p - zp_lo, zp_lo)
        hi_p = tl.where(go_up, nz_p + hi_p - zp_hi, zp_hi)
        lo_q = tl.where(go_up, nz_q + lo_q - zq_lo, zq_lo)
        hi_q = tl.where(go_up, nz_q + hi_q - zq_hi, zq_hi)

        nz_r = tl.load(zb + r_row + N)
        lo_1, hi_1, rank_1, ans_1 = _kth_step(zb + r_row, nz_r, lo_1, hi_1, rank_1, ans_1)
        lo_2, hi_2, rank_2, ans_2 = _kth_step(zb + r_row, nz_r, lo_2, hi_2, rank_2, ans_2)
        zb += LEVEL_STRIDE
        wb += WEIGHT_LEVEL_STRIDE

    tau = (s_p - s_q + n_q - topk) / tl.maximum(n_p - n_q, 1).to(tl.float64)
    out = row.to(tl.int64) * N + offs
    tl.store(TAU + out, tau, mask=inside)
    tl.store(KTH + out, ans_1, mask=inside)
    tl.store(KTH_NEXT + out, ans_2, mask=inside)


@triton.jit
def in_some_list(start, end, BLOCK: tl.constexpr):
    """Whether a key selected by the queries [start, end) is selected by some block's first query (a multiple
    of BLOCK), so that it appears in block lists. The attention's backward relies on this same rule."""
    return (end > start) & ((start + BLOCK - 1) // BLOCK * BLOCK < end)


@triton.jit
def _ranges_chunk(START, END, T, CHUNK: tl.constexpr):
    """A program's keys (a chunk of row program_id(0) of the [R, T] ranges): offsets, in-range mask, the row's
    offset, start and end."""
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    inside = offs < T
    base = tl.program_id(0).to(tl.int64) * T
    start = tl.load(START + base + offs, mask=inside, other=0)
    end = tl.load(END + base + offs, mask=inside, other=0)
    return offs, inside, base, start, end


@triton.jit
def evictions_kernel(START, END, EVICTED_AT, T, CHUNK: tl.constexpr):
    """EVICTED_AT [R, T] int32, filled with -1 before: at query i, the key that leaves the top-k there (end_j =
    i < T for a key ever selected). At most one key leaves at a query, as one enters (blocks.selection_slots)."""
    offs, inside, base, start, end = _ranges_chunk(START, END, T, CHUNK)
    tl.store(EVICTED_AT + base + end, offs, mask=inside & (end > start) & (end < T))


@triton.jit
def slot_parents_kernel(START, END, EVICTED_AT, PARENT, T, topk, CHUNK: tl.constexpr):
    """The parents of blocks.selection_slots -> PARENT [R, T] int32: a key ever selected past the first topk
    inherits the slot of the key evicted at its start (EVICTED_AT from evictions_kernel); every other key is its
    own parent (a negative parent, from bad scores, counts as 0 there too)."""
    offs, inside, base, start, end = _ranges_chunk(START, END, T, CHUNK)
    inherits = inside & (end > start) & (offs >= topk)             # then start < T
    evicted = tl.load(EVICTED_AT + base + start, mask=inherits, other=0)
    tl.store(PARENT + base + offs, tl.where(inherits, tl.maximum(evicted, 0), offs), mask=inside)


@triton.jit
def follow_parents_kernel(PARENT, OUT, T, STEPS: tl.constexpr, CHUNK: tl.constexpr):
    """Pointer jumping, STEPS links per launch: OUT[r, j] = PARENT[r, PARENT[r, ... j]] (STEPS lookups) for
    PARENT, OUT [R, T] int32 (negative parents count as 0, as in blocks.selection_slots)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    inside = offs < T
    base = row.to(tl.int64) * T
    key = offs
    for _ in tl.static_range(STEPS):
        key = tl.maximum(tl.load(PARENT + base + key, mask=inside, other=0), 0)
    tl.store(OUT + base + offs, key, mask=inside)


@triton.jit
def slot_entries_kernel(SLOT, START, END, LISTS, T, N_BLOCKS, N_SLOTS, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Every key present at some block's first query writes itself into LISTS [R, NB, K] at its slot and the
    first such block (its start rounded up to a block; it stays until its end). No two keys meet there: a
    slot holds one key at any query."""
    offs, inside, base, start, end = _ranges_chunk(START, END, T, CHUNK)
    slot = tl.load(SLOT + base + offs, mask=inside, other=-1)
    first = (start + BLOCK - 1) // BLOCK
    present = inside & (slot >= 0) & in_some_list(start, end, BLOCK)
    dest = (tl.program_id(0).to(tl.int64) * N_BLOCKS + first) * N_SLOTS + slot
    tl.store(LISTS + dest, offs, mask=present)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def fill_lists_kernel(LISTS, N_BLOCKS, N_SLOTS, BLOCK_CHUNK: tl.constexpr, SLOT_TILE: tl.constexpr):
    """Completes LISTS after slot_entries_kernel (-1 elsewhere): a slot's occupant at block b is the newest key
    written at or before b, since a slot's later occupants are newer keys (a key enters when it becomes the
    newest candidate). So the lists are a running maximum down the blocks, taken a chunk of blocks at a time."""
    row = tl.program_id(0)
    offs_s = tl.program_id(1) * SLOT_TILE + tl.arange(0, SLOT_TILE)
    slot_ok = offs_s < N_SLOTS
    list_row = LISTS + row.to(tl.int64) * N_BLOCKS * N_SLOTS
    carry = tl.full([SLOT_TILE], -1, dtype=tl.int32)
    for b0 in range(0, N_BLOCKS, BLOCK_CHUNK):
        offs_b = b0 + tl.arange(0, BLOCK_CHUNK)
        offs = offs_b[:, None].to(tl.int64) * N_SLOTS + offs_s[None, :]
        ok = (offs_b[:, None] < N_BLOCKS) & slot_ok[None, :]
        keys = tl.maximum(tl.load(list_row + offs, mask=ok, other=-1), carry[None, :])
        keys = tl.associative_scan(keys, 0, _max_combine)
        tl.store(list_row + offs, keys, mask=ok)
        carry = tl.max(keys, 0)
