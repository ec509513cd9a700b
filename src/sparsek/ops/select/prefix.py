"""Causal prefix selection: every query's SPARSEK threshold and every key's selection range, in O(T log T).

Shape legend: B batch, T sequence, H KV heads; internally R = B * H independent rows of length T.

For query i the candidates are the prefix C_i = {j <= i - w} (SPEC section 3), so everything is a question
about the prefixes of one row:

* Thresholds. tau(c) solves sum_{l < c} clip(u_l - tau, 0, 1) = topk. The function f_c(t) on the left is
  piecewise linear with breakpoints {u_l} and {u_l - 1}. Rank all 2T breakpoints of the row once (one sort);
  element l then owns two ranks, p_l (of u_l) and q_l (of u_l - 1). At the breakpoint t of rank b,

      f_c(t) = N_q(>= b) + S_p(>= b) - S_q(>= b) - t * (N_p(>= b) - N_q(>= b)),

  N and S counting / summing u over the first c elements whose p (or q) rank is >= b. Two wavelet matrices,
  over the p ranks and the q ranks, give those counts for every prefix c at once. A binary descent over the
  rank bits, in lockstep in both matrices, keeps the counts of all ranks above the current node and finds the
  last breakpoint with f_c >= topk in nbits = log2(2T) steps of O(1) work per query: O(T log T) per row,
  with O(T) memory because levels are built on the fly. tau then comes from the closed form of section 1.

* Selection ranges. Rank keys best-first under the total order (higher score, ties to the newer key). Key j
  drops out of the top-k once the prefix holds its k-th beater, the k-th smallest position among keys ranked
  above it: one k-th-smallest query on a wavelet matrix of positions in rank order, O(T log T) per row. So j
  is selected by queries [j + w, max(j, kth beater) + w), clipped to T.

* Threshold gradient. d tau_i / d u_l = 1 / |F_i| for the fractional entries F_i = {l in C_i : tau_i < u_l <
  tau_i + 1}. tau is non-decreasing in i, so the queries for which u_l is fractional form one range found by
  two binary searches; the backward is then prefix sums over queries: O(T log T), no T x T buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common import SELECTION_BACKENDS, check_backend, check_budget, interpreting
from .wavelet import bits_needed, kth_smallest_in_prefix, wavelet_levels

__all__ = ["Selection", "best_first_order", "prefix_selection", "select_rows", "threshold_backward"]


@dataclass
class Selection:
    """Result of `prefix_selection`, all [B, T, H]."""

    tau: Tensor    # threshold of each query (dtype of the scores), -inf while |C_i| <= topk; differentiable
    start: Tensor  # int64, first query that may select key j: min(j + window, T)
    end: Tensor    # int64, first query at or after start that no longer selects key j (<= T)


# Scores farther than this from their row's median enter the threshold sums clamped (see _prefix_thresholds).
SPREAD = 2.0 ** 20


def _prefix_thresholds(u: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """tau of every prefix: u [R, T] float64 -> tau [R, T] float64, entry c - 1 for the prefix of length c;
    fractional [R, T] bool, whether the prefix has entries strictly between 0 and 1 (f not flat at tau); and
    error [R, T] float64, how far such a tau may be off (inf where the clamped sums cannot resolve it)."""
    rows, t_len = u.shape
    n_breaks = 2 * t_len
    u_abs = u
    # Thresholds are shift invariant: descend relative to the row's median, or the sums of a large common
    # offset (1e15 + noise) cancel away the differences that decide tau.
    shift = u.median(dim=1, keepdim=True).values
    u = u - shift
    # u_l - 1 first: where it rounds to u_l (|u_l| >= 2^53), the stable sort must still rank it below u_l.
    breaks_unsorted = torch.cat([u - 1, u], dim=1)                        # [R, 2T]
    order = torch.argsort(breaks_unsorted, dim=1, stable=True)
    breaks = breaks_unsorted.gather(1, order)                             # ascending
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_breaks, device=u.device).expand_as(order))
    rank_q, rank_p = rank[:, :t_len], rank[:, t_len:]                     # ranks of u_l - 1 and of u_l

    nbits = bits_needed(n_breaks)
    prefix_len = torch.arange(1, t_len + 1, device=u.device).expand(rows, t_len)
    zeros_i = torch.zeros_like(prefix_len)
    lo_p, hi_p, lo_q, hi_q = zeros_i, prefix_len, zeros_i, prefix_len
    node = zeros_i                                                        # lowest rank of the current node
    n_p, n_q = zeros_i, zeros_i                                           # counts of ranks >= node end
    s_p = s_q = torch.zeros_like(u)                                       # sums of u over those

    # The sums only need u exactly where an entry can be fractional; clamping the rest keeps one far entry
    # (3e38 among values near 0) from swamping them, and keeps every decision of the descent right (clamped
    # weights err towards the side the descent takes anyway). A tau beyond the clamp is flagged below.
    weight = u.clamp(-SPREAD, SPREAD)
    levels = zip(wavelet_levels(rank_p, nbits, weight), wavelet_levels(rank_q, nbits, weight))
    for level, (lev_p, lev_q) in enumerate(levels):
        half = 1 << (nbits - 1 - level)
        zp_lo, zp_hi, ones_p = lev_p.count(lo_p, hi_p)
        zq_lo, zq_hi, ones_q = lev_q.count(lo_q, hi_q)
        # Counts of ranks >= mid (the upper child of the current node): what is above the node plus that child.
        up_n_p, up_n_q = n_p + ones_p, n_q + ones_q
        up_s_p, up_s_q = s_p + lev_p.ones_weight(lo_p, hi_p), s_q + lev_q.ones_weight(lo_q, hi_q)
        mid = node + half
        t = breaks.gather(1, mid.clamp(max=n_breaks - 1))
        f_mid = up_n_q + (up_s_p - up_s_q) - t * (up_n_p - up_n_q)
        go_up = (f_mid >= topk) & (mid < n_breaks)

        node = torch.where(go_up, mid, node)
        n_p, n_q = torch.where(go_up, n_p, up_n_p), torch.where(go_up, n_q, up_n_q)
        s_p, s_q = torch.where(go_up, s_p, up_s_p), torch.where(go_up, s_q, up_s_q)
        one_lo, one_hi = lev_p.to_ones(lo_p, hi_p, zp_lo, zp_hi)
        lo_p, hi_p = torch.where(go_up, one_lo, zp_lo), torch.where(go_up, one_hi, zp_hi)
        one_lo, one_hi = lev_q.to_ones(lo_q, hi_q, zq_lo, zq_hi)
        lo_q, hi_q = torch.where(go_up, one_lo, zq_lo), torch.where(go_up, one_hi, zq_hi)

    # tau lies strictly above the found breakpoint: U = n_q entries clipped to 1, n_p - n_q fractional ones.
    tau = (s_p - s_q + n_q - topk) / (n_p - n_q).clamp(min=1)
    # A gap of >= 1 below the k-th best value theta makes f == topk on the whole interval [u_(k+1), theta - 1];
    # rounding in f decides where in it the descent stopped. Take the midpoint, as the SPARSEK operator does:
    # every entry then sits clearly at 0 or 1 and gets no gradient.
    by_rank, rank = _best_first(u_abs)

    def best_in_prefix(kth: int) -> Tensor:  # the kth best value of every prefix (valid where c >= kth)
        kth_rank = kth_smallest_in_prefix(rank, bits_needed(t_len), prefix_len, kth).clamp(max=t_len - 1)
        return u_abs.gather(1, by_rank.gather(1, kth_rank))

    theta, below = best_in_prefix(topk), best_in_prefix(topk + 1)
    flat = theta - below >= 1
    fractional = (prefix_len > topk) & ~flat
    # Adding the shift back rounds (3e38 - 0.5 is 3e38 even in float64): count that in the error.
    tau_abs = tau + shift
    # Beyond the clamp the sums mislead the descent, so judge by theta too: tau lies in [theta - 1, theta).
    beyond = (tau.abs() > SPREAD - 2) | ((theta - shift).abs() > SPREAD - 1)
    error = torch.where(beyond, torch.inf, (tau_abs - shift - tau).abs())
    tau = torch.where(flat, 0.5 * (below + theta - 1), tau_abs.clamp(min=theta - 1))
    tau = torch.where(prefix_len > topk, tau, -torch.inf)
    return torch.cummax(tau, dim=1).values, fractional, error  # cummax: remove rounding wiggles


# Largest rounding of tau (to the dtype it is returned in) accepted where the mask is fractional:
# m_ij = u_j - tau_i moves by as much, so beyond it the masks no longer sum to topk.
TAU_ROUNDING = 2.0 ** -10


def _check_rounding(tau: Tensor, fractional: Tensor, error: Tensor, dtype: torch.dtype) -> None:
    """ValueError where a fractional prefix threshold (tau, fractional, error [R, n], see _prefix_thresholds) is
    too far from its row's median for the clamped sums, or too large to round to `dtype` (the dtype the caller
    returns it in) within TAU_ROUNDING. native.c runs the same test inside its sweep."""
    if (fractional & torch.isinf(error)).any():
        raise _spread_error()
    # Add the worst rounding to `dtype` by magnitude (half a unit at tau), so the check does not depend on luck.
    magnitude = tau.abs().to(dtype)
    half_unit = 0.5 * (torch.nextafter(magnitude, torch.full_like(magnitude, torch.inf)) - magnitude).double()
    # NaN scores (only the fused path's select_rows lets them in) pass: that path turns its output NaN instead.
    bad = fractional & (error + half_unit > TAU_ROUNDING)
    if bad.any():
        raise _rounding_error(float(tau[bad].abs().max()), dtype)


def _spread_error() -> ValueError:
    return ValueError(f"scores spread too wide: a threshold lies more than {SPREAD:.0f} from its row's median, "
                      f"beyond what the float64 threshold sums resolve")


def _rounding_error(worst: float, dtype: torch.dtype) -> ValueError:
    return ValueError(f"scores too large for {dtype} thresholds: |tau| reaches {worst:.4g}, where {dtype} rounds "
                      f"it by more than {TAU_ROUNDING} and the soft masks would not sum to topk; subtract a "
                      f"per-row offset from the scores (SPARSEK is shift invariant) or pass float64 scores")


def query_thresholds(u: Tensor, topk: int, window: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """tau_i for every query, u [R, T] float64 -> [R, T] float64: the prefix of length i - window + 1.

    Raises ValueError where `_check_rounding` does.
    """
    t_len = u.shape[1]
    tau = torch.full_like(u, -torch.inf)
    if window < t_len:
        tau_p, fractional, error = _prefix_thresholds(u[:, : t_len - window], topk)
        _check_rounding(tau_p, fractional, error, dtype)
        tau[:, window:] = tau_p
    return tau


def _native_selection(u: Tensor, topk: int, window: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """`select_rows` by native.c (CPU rows, topk >= 1): u [R, T] float64 -> tau [R, T] float64, start, end [R, T]
    int64. Raises ValueError where `_check_rounding` does for tau returned in `dtype`."""
    from . import native

    tau, start, end, status, worst = native.select_rows_native(u, topk, window, dtype)
    if native_gave_up(status, worst, dtype):          # bunched scores: the reference's O(T log T) thresholds
        return query_thresholds(u, topk, window, dtype), start, end
    return tau, start, end


def native_gave_up(status: int, worst: float, dtype: torch.dtype) -> bool:
    """What native.c's selection status (and the largest |tau| that failed its rounding check) means: ValueError
    where `_check_rounding` would raise for thresholds returned in `dtype`; True where the sweep gave up on
    bunched scores (the caller takes `query_thresholds`), False where all went well."""
    from .native import ROUNDING, SPREAD_EXCEEDED, TOO_MUCH_WORK

    if status & TOO_MUCH_WORK:                        # thresholds incomplete: the reference checks them itself
        return True
    if status & SPREAD_EXCEEDED:
        raise _spread_error()
    if status & ROUNDING:
        raise _rounding_error(worst, dtype)
    return False


def _fractional_query_ranges(u: Tensor, tau: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """For each key l, the queries [lo_l, hi_l) for which l is a candidate with tau_i < u_l < tau_i + 1."""
    t_len = u.shape[1]
    tau = tau.contiguous()
    hi = torch.searchsorted(tau, u.contiguous(), right=False)               # tau_i < u_l  <=>  i < hi
    lo = torch.searchsorted(tau, (u - 1).contiguous(), right=True)          # tau_i > u_l - 1  <=>  i >= lo
    lo = torch.maximum(lo, torch.arange(t_len, device=u.device) + window).clamp(max=t_len)
    return lo, torch.maximum(hi, lo)


def threshold_backward(u: Tensor, tau: Tensor, window: int, grad_tau: Tensor) -> Tensor:
    """Gradient of the scores through the thresholds: u, tau, grad_tau [R, T] -> [R, T].

    Each fractional entry l of query i receives grad_tau_i / |F_i|; the queries for which l is fractional
    form one range, so this is a difference of prefix sums over queries.
    """
    lo, hi = _fractional_query_ranges(u, tau, window)
    t_len = u.shape[1]
    cover = torch.zeros(u.shape[0], t_len + 1, dtype=torch.int64, device=u.device)
    cover.scatter_add_(1, lo, torch.ones_like(lo)).scatter_add_(1, hi, -torch.ones_like(hi))
    n_frac = torch.cumsum(cover, dim=1)[:, :t_len]                        # |F_i|: ranges covering query i
    share = torch.where(n_frac > 0, grad_tau / n_frac.clamp(min=1), 0)
    share_before = torch.nn.functional.pad(torch.cumsum(share, dim=1), (1, 0))
    return share_before.gather(1, hi) - share_before.gather(1, lo)


class _QueryThresholds(torch.autograd.Function):
    """u [R, T] float64 -> tau [R, T] float64 (differentiable), start, end [R, T] int64, by the reference or,
    with `native`, by native.c."""

    @staticmethod
    def forward(ctx, u: Tensor, topk: int, window: int, dtype: torch.dtype, native: bool):
        if native:
            tau, start, end = _native_selection(u, topk, window, dtype)
        else:
            tau, (start, end) = query_thresholds(u, topk, window, dtype), key_ranges(u, topk, window)
        ctx.save_for_backward(u, tau)
        ctx.window, ctx.native = window, native
        ctx.mark_non_differentiable(start, end)
        return tau, start, end

    @staticmethod
    def backward(ctx, grad_tau: Tensor, _grad_start, _grad_end):
        u, tau = ctx.saved_tensors
        if ctx.native:
            from .native import threshold_backward_native

            return threshold_backward_native(u, tau, ctx.window, grad_tau), None, None, None, None
        return threshold_backward(u, tau, ctx.window, grad_tau), None, None, None, None


def best_first_order(u: Tensor) -> tuple[Tensor, Tensor]:
    """Sort keys under the total order (higher score, ties to the newer key), u [R, T] -> (the scores in that
    order, by_rank: position of the rank-r key [R, T] int64)."""
    t_len = u.shape[1]
    scores, newest_first = torch.sort(u.flip(1), dim=1, descending=True, stable=True)  # stable: newer wins ties
    return scores, (t_len - 1) - newest_first


def _best_first(u: Tensor) -> tuple[Tensor, Tensor]:
    """Rank keys under the total order (higher score, ties to the newer key), u [R, T] ->
    (by_rank: position of the rank-r key, rank: rank of the key at each position), both [R, T] int64."""
    _, by_rank = best_first_order(u)
    positions = torch.arange(u.shape[1], device=u.device).expand_as(by_rank)
    return by_rank, torch.empty_like(by_rank).scatter_(1, by_rank, positions)


def key_ranges(u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor]:
    """start_j and end_j for every key, u [R, T] -> two [R, T] int64."""
    rows, t_len = u.shape
    positions = torch.arange(t_len, device=u.device).expand(rows, t_len)
    start = (positions + window).clamp(max=t_len)
    if topk == 0:
        return start, start
    by_rank, rank = _best_first(u)
    kth_beater = kth_smallest_in_prefix(by_rank, bits_needed(t_len), rank, topk)
    end = torch.where(rank >= topk, torch.maximum(kth_beater, positions) + window, t_len)
    return start, torch.maximum(end.clamp(max=t_len), start)


def prefix_selection(scores: Tensor, topk: int, window: int, *, backend: str = "reference") -> Selection:
    """Thresholds and selection ranges of causal SparseK attention (SPEC section 3).

    Args:
        scores: [B, T, H] float32 or float64, finite; one score per key and KV head.
        topk: number of selected keys per query (>= 0).
        window: sliding-window width w (>= 0); the candidates of query i are the keys j <= i - w.
        backend: "reference" (this module, in PyTorch: the rule's statement, any device), "triton" (its twin in
            ops/select/fused.py: float32 scores on CUDA, or on the CPU under TRITON_INTERPRET=1), "native" (its
            twin in ops/select/native.c, compiled on first use: CPU, needs a C compiler) or "auto" (Triton for
            float32 scores on CUDA, native on the CPU where it builds, else the reference). All give the same
            selection and tau (to the rounding of their dtype) and the same gradient.

    Returns:
        Selection with tau, start, end as [B, T, H]: key j is selected by exactly the queries
        start_j <= i < end_j, and m_ij = clip(u_j - tau_i, 0, 1) there. tau carries the gradient of the
        threshold w.r.t. the scores (the tau path of SPEC section 3b).

    Raises:
        ValueError: for invalid arguments, and where tau is so large that rounding it to the scores' dtype
            would move a fractional m_ij by more than 2^-10 (float32: |tau| >= 2^15).
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, T, H], got shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"scores must be float32 or float64, got {scores.dtype}")
    if scores.numel() and not math.isfinite(float(scores.detach().abs().max())):    # NaN or inf where any is
        raise ValueError("scores must be finite (found NaN or inf)")
    check_budget(topk, window, allow_empty=True)
    check_backend(backend, SELECTION_BACKENDS)

    batch, t_len, heads = scores.shape
    rows = scores.permute(0, 2, 1).reshape(batch * heads, t_len)         # [R, T]
    use_triton = _triton_selection(rows, backend)
    if t_len == 0 or topk == 0:
        tau_rows = torch.full_like(rows, -torch.inf)
        start, end = key_ranges(rows.detach(), topk, window)
    elif use_triton:
        from .fused import TritonThresholds
        largest = float(rows.detach().abs().max())
        if largest >= TRITON_SCORE_LIMIT:
            raise ValueError(f"backend='triton' takes scores below {TRITON_SCORE_LIMIT:g} in magnitude (its "
                             f"thresholds are float32), got {largest:.4g}: use backend='reference'")
        tau_rows, start, end = TritonThresholds.apply(rows.contiguous(), topk, window)
    else:
        tau_rows, start, end = _QueryThresholds.apply(rows.double(), topk, window, scores.dtype,
                                                      _native_selection_for(rows, backend))
        tau_rows = tau_rows.to(scores.dtype)

    def to_bth(x: Tensor) -> Tensor:
        return x.reshape(batch, heads, t_len).permute(0, 2, 1)

    return Selection(tau=to_bth(tau_rows), start=to_bth(start), end=to_bth(end))


# Scores below this magnitude keep |tau| < 2^15, where rounding tau to float32 (the Triton selection's) moves a mask
# entry by at most half a unit, 2^-10 (TAU_ROUNDING); the reference checks each threshold instead.
TRITON_SCORE_LIMIT = 2.0 ** 14


def _native_selection_for(rows: Tensor, backend: str) -> bool:
    """Whether prefix_selection runs native.c: for "native" (ValueError where it cannot), and for "auto" on CPU
    rows where a C compiler built it."""
    if backend not in ("native", "auto") or (backend == "auto" and rows.is_cuda):
        return False
    from . import native

    if backend == "native" and (rows.device.type != "cpu" or not native.available()):
        reason = native.unavailable_reason() or f"it runs on CPU tensors, got {rows.device}"
        raise ValueError(f"backend='native' cannot run: {reason}")
    return rows.device.type == "cpu" and native.available()


def _triton_selection(rows: Tensor, backend: str) -> bool:
    """Whether prefix_selection runs its Triton twin: for "triton" (ValueError where it cannot), and for "auto"
    on CUDA float32 scores when triton is installed."""
    if backend in ("reference", "native"):
        return False
    try:
        from . import fused  # noqa: F401 (triton is an optional extra)
    except ImportError:
        fused = None
    usable = fused is not None and rows.dtype == torch.float32 and (rows.is_cuda or interpreting())
    if backend == "triton" and not usable:
        raise ValueError("backend='triton' needs the triton package and float32 scores on CUDA (or on the CPU with "
                         f"TRITON_INTERPRET=1), got {rows.dtype} on {rows.device}")
    return usable and (backend == "triton" or rows.is_cuda) and rows.numel() > 0   # no rows: nothing to launch


@torch.no_grad()
def select_rows(u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """`prefix_selection` on rows, without autograd: u [R, T] float -> tau [R, T] float64, start, end int64.

    For the fused kernels, which apply `threshold_backward` themselves.
    """
    u = u.double()
    if u.shape[1] == 0 or topk == 0:
        tau = torch.full_like(u, -torch.inf)
    else:
        tau = query_thresholds(u, topk, window)
    start, end = key_ranges(u, topk, window)
    return tau, start, end
