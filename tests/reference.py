"""Independent, deliberately simple float64 reference implementations of SPEC sections 1-3.

Nothing here imports ``sparsek``: these are the oracles the tests compare the library with.
They are slow (bisection, per-query Python loops) but each step is a direct transcription of SPEC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# SPARSEK threshold by bisection (SPEC section 1)
# --------------------------------------------------------------------------------------------


@dataclass
class TauRef:
    """Reference thresholds for a batch of rows.

    ``lo``/``hi`` bound the set of solutions of f(tau) = k, f(tau) = sum_i clip(z_i - tau, 0, 1).
    The solution is unique (lo == hi up to rounding) unless there is no fractional entry
    (integer k and a gap of at least 1 around the k-th value); then any tau in [lo, hi] is valid
    and gives the same mask.  ``tau`` is the midpoint.  Rows with k >= n_finite get -inf everywhere.
    """

    tau: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def degenerate(self) -> np.ndarray:
        fin = np.isfinite(self.lo)
        return fin & (np.where(fin, self.hi, 0.0) - np.where(fin, self.lo, 0.0) > 1e-9)


def _f(Z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """f(t) = sum_i clip(z_i - t, 0, 1) per row (entries equal to -inf contribute 0)."""
    return np.clip(Z - t[:, None], 0.0, 1.0).sum(axis=1)


def tau_bisect(Z, k, iters: int = 200) -> TauRef:
    """Brute-force SPARSEK thresholds of the rows of ``Z`` ([R, n], -inf marks absent entries).

    ``k`` is a scalar or one budget per row.  Two bisections (to machine precision) find the smallest
    and the largest tau with f(tau) = k.
    """
    Z = np.atleast_2d(np.asarray(Z, dtype=np.float64))
    R = Z.shape[0]
    k = np.broadcast_to(np.asarray(k, dtype=np.float64), (R,)).astype(np.float64)
    finite = np.isfinite(Z)
    n_finite = finite.sum(axis=1)
    active = n_finite > k
    zmax = np.where(finite, Z, -np.inf).max(axis=1, initial=-np.inf)
    zmin = np.where(finite, Z, np.inf).min(axis=1, initial=np.inf)
    zmax = np.where(active, zmax, 0.0)
    zmin = np.where(active, zmin, 0.0)
    Zs = np.where(active[:, None], Z, -np.inf)

    # smallest solution a = inf{t : f(t) <= k}; invariant f(lo) > k, f(hi) <= k
    lo, hi = zmin - 1.0, zmax.copy()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = _f(Zs, mid) <= k
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    a = hi
    # largest solution b = sup{t : f(t) >= k}; invariant f(lo) >= k, f(hi) < k
    lo, hi = zmin - 1.0, zmax.copy()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = _f(Zs, mid) < k
        hi = np.where(below, mid, hi)
        lo = np.where(below, lo, mid)
    b = lo
    a, b = np.minimum(a, b), np.maximum(a, b)
    tau = 0.5 * (a + b)
    ninf = np.full(R, -np.inf)
    return TauRef(np.where(active, tau, ninf), np.where(active, a, ninf), np.where(active, b, ninf))


def sparsek_ref(z, k) -> np.ndarray:
    """SPARSEK(z, k) of the rows of ``z`` ([R, n] or [n]) in float64: clip(z - tau, 0, 1); -inf gets 0."""
    z = np.asarray(z, dtype=np.float64)
    Z = np.atleast_2d(z)
    ref = tau_bisect(Z, k)
    with np.errstate(invalid="ignore"):
        p = np.clip(Z - ref.tau[:, None], 0.0, 1.0)
    p = np.where(np.isneginf(ref.tau)[:, None], 1.0, p)  # k >= n_finite: all (finite) ones
    p = np.where(np.isfinite(Z), p, 0.0)
    return p.reshape(z.shape)


def sparsemax_ref(z) -> np.ndarray:
    """Sort-based sparsemax (Martins & Astudillo 2016) of a 1-D vector, in float64."""
    z = np.asarray(z, dtype=np.float64)
    zs = np.sort(z)[::-1]
    cs = np.cumsum(zs)
    r = np.arange(1, len(z) + 1)
    support = 1.0 + r * zs > cs
    kz = r[support].max()
    tau = (cs[kz - 1] - 1.0) / kz
    return np.maximum(z - tau, 0.0)


def breakpoint_margin(z, k) -> float:
    """Distance of the rows of ``z`` from the nearest breakpoint of SPARSEK (z_i = tau or tau + 1).

    SPARSEK is affine in z between breakpoints (ties do not matter), so a large margin means finite
    differences around z are exact up to rounding.
    """
    Z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    ref = tau_bisect(Z, k)
    m = math.inf
    for row, t in zip(Z, ref.tau):
        row = row[np.isfinite(row)]
        if np.isfinite(t):
            m = min(m, float(np.min(np.abs(row - t))), float(np.min(np.abs(row - t - 1.0))))
    return m


# --------------------------------------------------------------------------------------------
# Prefix selection (SPEC section 3)
# --------------------------------------------------------------------------------------------


def candidates(i: int, window: int) -> list[int]:
    """C_i = {j : j <= i - w}."""
    return list(range(0, max(0, i - window + 1)))


def window_set(i: int, window: int) -> list[int]:
    """W_i = {j : i - w < j <= i}."""
    return list(range(max(0, i - window + 1), i + 1))


def best_candidates(u, cand: list[int], topk: int) -> list[int]:
    """S_i: the min(k, |C_i|) best candidates; j beats l if u_j > u_l, or u_j == u_l and j > l."""
    order = sorted(cand, key=lambda j: (-float(u[j]), -j))
    return order[: min(topk, len(cand))]


def prefix_tau_ref(u, topk, window, queries=None) -> TauRef:
    """Reference tau_i for the queries of one row ``u`` [T] (float64 numpy): SPARSEK threshold of C_i."""
    u = np.asarray(u, dtype=np.float64)
    T = len(u)
    queries = list(range(T)) if queries is None else list(queries)
    Z = np.full((len(queries), T), -np.inf)
    for r, i in enumerate(queries):
        c = candidates(i, window)
        Z[r, c] = u[c]
    if len(queries) == 0:
        e = np.zeros(0)
        return TauRef(e, e, e)
    return tau_bisect(Z, float(topk))


# --------------------------------------------------------------------------------------------
# Naive SparseK attention (SPEC section 3), differentiable, one query at a time
# --------------------------------------------------------------------------------------------


def differentiable_tau(u_cand: torch.Tensor, k: float, t_ref: float) -> torch.Tensor:
    """tau = (sum_{fractional} u + |U| - k) / |fractional| with the sets fixed from ``t_ref``.

    Autograd through this closed form gives d tau / d u_j = 1/|F| for fractional j (SPEC 3b).
    With no fractional entry (gap >= 1) tau is locally constant: returns a constant.
    """
    ud = u_cand.detach()
    frac = (ud > t_ref) & (ud < t_ref + 1.0)
    ones = ud >= t_ref + 1.0
    nf = int(frac.sum())
    if nf == 0:
        return torch.tensor(t_ref, dtype=u_cand.dtype)
    return (u_cand[frac].sum() + float(ones.sum()) - k) / nf


def _segments(T: int, cu_seqlens) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    cu = [int(x) for x in cu_seqlens]
    return [(cu[s], cu[s + 1]) for s in range(len(cu) - 1)]


def naive_sparsek_attention(
    q, k, v, scores, *, topk, window, gate="kv", scale=None, cu_seqlens=None, queries=None
):
    """Per-query loop transcription of SPEC section 3, differentiable w.r.t. all inputs.

    q [B, T, Hq, D], k/v [B, T, Hkv, D], scores [B, T, Hkv]; inputs are used as given (pass float64).
    Returns [B, T, Hq, D] (or [B, len(queries), Hq, D] when ``queries`` restricts the query positions;
    ``queries`` is only supported without ``cu_seqlens``).
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qpos = list(range(T)) if queries is None else list(queries)
    rows = {}
    for b in range(B):
        for s0, s1 in _segments(T, cu_seqlens):
            n = s1 - s0
            if n == 0:
                continue
            local = [p - s0 for p in qpos if s0 <= p < s1]
            for hk in range(Hkv):
                u = scores[b, s0:s1, hk]
                u_np = u.detach().cpu().double().numpy()
                taus = prefix_tau_ref(u_np, topk, window, local) if topk > 0 else None
                for r, i in enumerate(local):
                    cand = candidates(i, window)
                    win = window_set(i, window)
                    sel = best_candidates(u_np, cand, topk)
                    if gate == "none" or len(cand) <= topk or not sel:
                        m_sel = torch.ones(len(sel), dtype=u.dtype)
                    else:
                        tau = differentiable_tau(u[cand], float(topk), float(taus.tau[r]))
                        m_sel = torch.clamp(u[sel] - tau, 0.0, 1.0)
                    idx = torch.tensor(sel + win, dtype=torch.long)
                    m = torch.cat([m_sel, torch.ones(len(win), dtype=u.dtype)]).to(q.dtype)
                    K = k[b, s0 + idx, hk]
                    V = v[b, s0 + idx, hk]
                    for h in range(hk * G, (hk + 1) * G):
                        s = scale * (K @ q[b, s0 + i, h])
                        if gate == "kv":
                            a = torch.softmax(m * s, dim=0)
                            o = a @ (m[:, None] * V)
                        elif gate == "v":
                            a = torch.softmax(s, dim=0)
                            o = a @ (m[:, None] * V)
                        elif gate == "none":
                            a = torch.softmax(s, dim=0)
                            o = a @ V
                        else:
                            raise ValueError(gate)
                        rows[(b, s0 + i, h)] = o
    out = torch.stack(
        [torch.stack([torch.stack([rows[(b, p, h)] for h in range(Hq)]) for p in qpos]) for b in range(B)]
    )
    return out


def selection_margin(u, topk, window) -> float:
    """Smallest distance of any candidate score from tau_i or tau_i + 1, and between distinct scores.

    Large margin => the SparseK attention output is a smooth function of the scores near ``u`` (so
    finite differences are valid).  ``u`` is one row [T].
    """
    u = np.asarray(u, dtype=np.float64)
    T = len(u)
    m = math.inf
    s = np.sort(u)
    if T > 1:
        m = float(np.min(np.diff(s)))
    if topk > 0:
        ref = prefix_tau_ref(u, topk, window)
        for i in range(T):
            c = candidates(i, window)
            if np.isfinite(ref.tau[i]):
                uc = u[c]
                m = min(m, float(np.min(np.abs(uc - ref.tau[i]))), float(np.min(np.abs(uc - ref.tau[i] - 1))))
    return m
