"""Triton kernel of the SPARSEK threshold of a decode cache's kept candidate scores: one program per row,
z [B * H, C] float64, -inf padded, -> tau [B * H] float64 (kept.py describes the method)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _probe_chunk(d, f, n_right, n_left, gap_right, gap_left):
    """`_probe`'s sums, per lane, plus one chunk of d = z - t (-inf for padding: no mass, no breakpoint, no
    NaN)."""
    right = (d > 0) & (d <= 1)
    left = (d >= 0) & (d < 1)
    f += tl.minimum(tl.maximum(d, 0.0), 1.0)
    n_right += right.to(tl.int32)
    n_left += left.to(tl.int32)
    # Right of t the next breakpoint of a free entry is z itself, of an entry clipped at 1 it is z - 1; left of
    # t it is z - 1 for an entry free on the left and z for one below t.
    gap_right = tl.minimum(gap_right, tl.where(right, d, tl.where(d > 1, d - 1.0, float("inf"))))
    gap_left = tl.minimum(gap_left, tl.where(d < 0, -d, tl.where(left, 1.0 - d, float("inf"))))
    return f, n_right, n_left, gap_right, gap_left


@triton.jit
def _probe(z_row, C, t, BLOCK: tl.constexpr):
    """f(t) = sum_i clip(z_i - t, 0, 1) and the linear pieces of f on either side of t: the number of entries
    free just right of t (0 < z - t <= 1) and just left of it (0 <= z - t < 1), and the distance from t to the
    nearest breakpoint (a z_i or a z_i - 1) on the right and on the left."""
    offs = tl.arange(0, BLOCK)
    f = tl.zeros([BLOCK], dtype=tl.float64)
    n_right = tl.zeros([BLOCK], dtype=tl.int32)
    n_left = tl.zeros([BLOCK], dtype=tl.int32)
    gap_right = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    gap_left = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    for c0 in range(0, C, BLOCK):
        z = tl.load(z_row + c0 + offs, mask=c0 + offs < C, other=float("-inf"))
        f, n_right, n_left, gap_right, gap_left = _probe_chunk(z - t, f, n_right, n_left, gap_right, gap_left)
    # Separate reductions rather than one tl.reduce over a tuple: the interpreter runs a tuple reduce element
    # by element in Python.
    return (tl.sum(f, 0), tl.sum(n_right, 0), tl.sum(n_left, 0), tl.min(gap_right, 0), tl.min(gap_left, 0))


@triton.jit
def kept_threshold_kernel(Z, TAU, C, K, NEWTON_ITERS: tl.constexpr, MAX_ITERS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """TAU[pid] = row_threshold of row Z[pid] (C entries)."""
    row = tl.program_id(0)
    tl.store(TAU + row, row_threshold(Z + row.to(tl.int64) * C, C, K, 0.0, NEWTON_ITERS, MAX_ITERS, BLOCK,
                                      HINTED=False))


@triton.jit
def row_threshold(z_row, C, K, hint, NEWTON_ITERS: tl.constexpr, MAX_ITERS: tl.constexpr, BLOCK: tl.constexpr,
                  HINTED: tl.constexpr):
    """tau of the row z_row[0:C] (float64, -inf padded) with budget K: sum_i clip(z_i - tau, 0, 1) = K, the
    midpoint of the solution interval when f is flat at K, -inf when K >= #finite. With HINTED, the search
    probes `hint` first (a float64 scalar near tau, such as the previous decode step's): any value is safe,
    since the bracket and the certificates below decide the answer; a good one saves most of the probes."""
    offs = tl.arange(0, BLOCK)

    z_max = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    z_min = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    n_finite = tl.zeros([BLOCK], dtype=tl.int32)
    # With HINTED, the same scan also probes the hint (`_probe`'s sums, in its order): when the hint lies inside
    # the bracket it is the first probe, and that saves a pass over the row.
    f_h = tl.zeros([BLOCK], dtype=tl.float64)
    n_right_h = tl.zeros([BLOCK], dtype=tl.int32)
    n_left_h = tl.zeros([BLOCK], dtype=tl.int32)
    gap_right_h = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    gap_left_h = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    at = tl.where(tl.abs(hint) < float("inf"), hint, 0.0)   # a hint that is not finite is never probed: no NaN
    for c0 in range(0, C, BLOCK):
        z = tl.load(z_row + c0 + offs, mask=c0 + offs < C, other=float("-inf"))
        finite = z > float("-inf")
        z_max = tl.maximum(z_max, z)
        z_min = tl.minimum(z_min, tl.where(finite, z, float("inf")))
        n_finite += finite.to(tl.int32)
        if HINTED:
            f_h, n_right_h, n_left_h, gap_right_h, gap_left_h = _probe_chunk(
                z - at, f_h, n_right_h, n_left_h, gap_right_h, gap_left_h)
    z_max = tl.max(z_max, 0)
    z_min = tl.min(z_min, 0)
    n_finite = tl.sum(n_finite, 0)
    no_threshold = K >= n_finite
    if HINTED:
        hinted = (tl.sum(f_h, 0), tl.sum(n_right_h, 0), tl.sum(n_left_h, 0), tl.min(gap_right_h, 0),
                  tl.min(gap_left_h, 0))

    # Bracket [lo, hi] with f(lo) >= K > f(hi): f(min - 2) = #finite > K and f(max) = 0 < K.
    lo = z_min - 2.0
    hi = z_max
    tau_lo = lo          # the root of the linear piece right of lo (the answer if the search runs out)
    answer = lo          # a certified root, once found
    guess = lo           # Newton's next point; lo itself (or anything outside the bracket) means "bisect"
    if HINTED:
        guess = tl.minimum(tl.maximum(hint, lo), hi)
    found = n_finite < 0
    unique = found       # the certified root lies well inside its linear piece: f is flat nowhere near it
    done = no_threshold
    it = 0
    while (it < MAX_ITERS) & (done == 0):
        # Newton steps on the piece at the last probe first; plain bisection after NEWTON_ITERS guarantees the
        # bracket halves to adjacent doubles (or below 2^-64 of its width) if Newton is slow.
        use_guess = (it < NEWTON_ITERS) & (guess > lo) & (guess < hi)
        p = tl.where(use_guess, guess, lo + 0.5 * (hi - lo))
        p = tl.minimum(tl.maximum(p, lo), hi)
        collapsed = (p <= lo) | (p >= hi)            # no double left strictly inside the bracket
        if HINTED:
            if (it == 0) & use_guess:                  # p is the hint itself (strictly inside the bracket)
                f, n_right, n_left, gap_right, gap_left = hinted
            else:
                f, n_right, n_left, gap_right, gap_left = _probe(z_row, C, p, BLOCK)
        else:
            f, n_right, n_left, gap_right, gap_left = _probe(z_row, C, p, BLOCK)
        above = f >= K
        # The root of the piece right (left) of p; it is the root of f when it lies within that piece.
        step_right = (f - K) / tl.maximum(n_right, 1)
        step_left = (K - f) / tl.maximum(n_left, 1)
        root_right = tl.where(n_right > 0, p + step_right, p)
        root_left = tl.where(n_left > 0, p - step_left, p)
        certified_right = above & (n_right > 0) & (step_right <= gap_right)
        certified_left = (f < K) & (n_left > 0) & (step_left <= gap_left)
        flat = above & (n_right == 0) & (f == K)    # f == K on a whole interval right of p
        # A root further than `margin` from both ends of its piece (which holds no breakpoint and has slope -n < 0)
        # is where f crosses K strictly, so f is flat at K nowhere: the flat check below would keep it. The
        # margin stands well above the rounding of f (a sum of up to C terms in [0, 1]) and of the distances.
        margin = 1e-6 * (1.0 + tl.abs(p))
        unique = tl.where(certified_right, (step_right > margin) & (step_right < gap_right - margin),
                          certified_left & (step_left > margin) & (step_left < gap_left - margin))
        lo = tl.where(above, p, lo)
        hi = tl.where(above, hi, p)
        tau_lo = tl.where(above, root_right, tau_lo)
        guess = tl.where(above, root_right, root_left)
        answer = tl.where(certified_right, root_right, tl.where(certified_left, root_left,
                                                                tl.where(flat, p, answer)))
        found = found | certified_right | certified_left | flat
        done = found | collapsed
        it += 1
    t = tl.where(found, answer, tl.minimum(tl.maximum(tau_lo, lo), hi))
    t = tl.where(no_threshold, 0.0, t)
    if unique & (no_threshold == 0):                # the usual decode step: no pass over the row left
        tau = t
    else:
        tau = _flat_midpoint(z_row, C, K, t, BLOCK)
    return tl.where(no_threshold, float("-inf"), tau)


@triton.jit
def _flat_midpoint(z_row, C, K, t, BLOCK: tl.constexpr):
    """tau from the search's root t: t itself, or where f is flat at K (integer K with a gap of at least 1
    under the K-th largest value theta) the midpoint of [z_(K+1), theta - 1], as the reference returns. At any
    s with exactly K entries above it, those are the top K, so min{z > s} and max{z <= s} are exactly theta and
    z_(K+1). t lies in or at an end of the flat interval (up to rounding), and then t or t + 1 is such an s."""
    offs = tl.arange(0, BLOCK)
    s = t + 1.0
    n_above_t = tl.zeros([BLOCK], dtype=tl.int32)
    n_above_s = tl.zeros([BLOCK], dtype=tl.int32)
    next_t = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    next_s = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    prev_t = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    prev_s = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    for c0 in range(0, C, BLOCK):
        z = tl.load(z_row + c0 + offs, mask=c0 + offs < C, other=float("-inf"))
        n_above_t += (z > t).to(tl.int32)
        n_above_s += (z > s).to(tl.int32)
        next_t = tl.minimum(next_t, tl.where(z > t, z, float("inf")))
        next_s = tl.minimum(next_s, tl.where(z > s, z, float("inf")))
        prev_t = tl.maximum(prev_t, tl.where(z > t, float("-inf"), z))
        prev_s = tl.maximum(prev_s, tl.where(z > s, float("-inf"), z))
    n_above_t, next_t, prev_t = tl.sum(n_above_t, 0), tl.min(next_t, 0), tl.max(prev_t, 0)
    n_above_s, next_s, prev_s = tl.sum(n_above_s, 0), tl.min(next_s, 0), tl.max(prev_s, 0)
    at_t = n_above_t == K
    matched = at_t | (n_above_s == K)
    theta = tl.where(at_t, next_t, tl.where(matched, next_s, t))
    below = tl.where(at_t, prev_t, tl.where(matched, prev_s, t))
    flat = theta - below >= 1.0
    return tl.where(flat, 0.5 * (below + theta - 1.0), t)
