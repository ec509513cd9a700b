"""The SPARSEK operator in PyTorch: the Euclidean projection onto the capped simplex.

    SPARSEK(z, k) = argmin_p ||p - z||^2  s.t.  0 <= p_i <= 1, sum_i p_i = k
                  = clip(z - tau, 0, 1),  tau solving  f(tau) = sum_i clip(z_i - tau, 0, 1) = k

f is continuous, non-increasing and piecewise linear with breakpoints {z_i} and {z_i - 1}. We sort z once,
evaluate f at all 2n breakpoints with prefix sums and binary searches, take the linear piece where f crosses
k, and solve it in closed form: tau = (sum of z_i strictly inside (tau, tau + 1) + U - k) / (W - U), U the
entries clipped to 1 and W the entries above tau. Cost O(n log n) per row, memory O(n).
All of it runs relative to the ceil(k)-th largest entry (`_relative`), so large offsets and far-away
entries cannot swamp the differences that decide tau.

Shapes: the operator works along `dim` of any tensor; below the working dim is always the last one, [..., n].
"""

from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor

from ..common import compute_dtype

__all__ = ["sparsek", "sparsek_threshold"]


def _check_dim(dim) -> int:
    """dim as a Python int; ValueError for anything else (bool included: True is not an axis)."""
    if isinstance(dim, bool):
        raise ValueError(f"dim must be an int, got bool {dim!r}")
    try:
        return operator.index(dim)
    except TypeError:
        raise ValueError(f"dim must be an int, got {type(dim).__name__} {dim!r}") from None


def _budget_tensor(k, z_last: Tensor, dim: int) -> Tensor:
    """k as a tensor of z_last.shape[:-1] in z_last's dtype and device (z_last is z with `dim` moved last).

    k is a real number, a real tensor (or a list/array of numbers) broadcastable to z's shape without `dim`,
    or that shape with `dim` kept as size 1 (what a reduction with keepdim=True gives).
    """
    accepted = "a positive number or a real tensor broadcastable to z's shape without dim (or with dim kept as 1)"
    if isinstance(k, bool):
        raise ValueError(f"k must be {accepted}, got bool {k!r}")
    if isinstance(k, Tensor) and (k.dtype == torch.bool or k.is_complex()):
        raise ValueError(f"k must be {accepted}, got a {k.dtype} tensor")
    if isinstance(k, numbers.Real):
        k_t = torch.tensor(float(k), dtype=z_last.dtype, device=z_last.device)
    else:
        if not isinstance(k, Tensor):
            try:
                values = torch.as_tensor(k)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"k must be {accepted}, got {type(k).__name__} {k!r:.80}") from None
            if values.dtype == torch.bool or values.is_complex():
                raise ValueError(f"k must be {accepted}, got {values.dtype} values")
            k = torch.as_tensor(k, dtype=torch.float64)  # not via float32: k = [2.1] stays 2.1 in float64
        k_t = k.detach().to(dtype=z_last.dtype, device=z_last.device)
    if torch.isnan(k_t).any() or (k_t <= 0).any():
        raise ValueError(f"k must be > 0 everywhere, got {k if k_t.numel() == 1 else 'a tensor with k <= 0'}")
    batch_shape, k_shape = z_last.shape[:-1], tuple(k_t.shape)
    if k_t.dim() == len(batch_shape) + 1 and k_t.shape[dim] == 1:
        k_t = k_t.squeeze(dim)  # keepdim layout: k has z's rank with size 1 along dim
    try:
        return torch.broadcast_to(k_t, batch_shape)
    except RuntimeError:
        raise ValueError(f"k of shape {k_shape} broadcasts neither to z's shape without dim, "
                         f"{tuple(batch_shape)}, nor to it with dim kept as size 1") from None


def _prepare(z: Tensor, k, dim: int) -> tuple[Tensor, Tensor, int]:
    """Validate, move `dim` last and return (z [..., n], k [...], dim) in the compute dtype."""
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor, got {type(z).__name__} "
                         f"{getattr(z, 'dtype', '')}")
    if z.dim() == 0:
        raise ValueError("z must have at least one dimension (dim)")
    dim = _check_dim(dim)
    if not -z.dim() <= dim < z.dim():
        raise ValueError(f"dim={dim} is out of range for z with {z.dim()} dimensions")
    dim = dim % z.dim()
    if z.shape[dim] == 0:
        raise ValueError(f"z has an empty dimension dim={dim}; SPARSEK needs at least one entry")
    if torch.isnan(z).any():
        raise ValueError("z contains NaN")
    if torch.isposinf(z).any():
        raise ValueError("z contains +inf; entries must be finite or -inf")

    z_last = z.detach().movedim(dim, -1).to(compute_dtype(z.dtype))
    return z_last.contiguous(), _budget_tensor(k, z_last, dim), dim


def _relative(z: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z [..., n] relative to theta, its ceil(k)-th largest entry: (y [..., n], theta [...], below [...]).

    SPARSEK is shift invariant and tau lies in [theta - 1, theta), so entries at or below theta - 1 get 0
    and those at or above theta + 1 get 1 whatever their value: y = clamp(z - theta, -2, 2) (-inf stays
    -inf) has the same mask. Computed in z's units, large offsets (1e8 + noise in float32) make tau
    unrepresentable, and far entries (+-3e38) overflow or swamp the sums that locate tau. Near theta,
    z - theta is exact (Sterbenz) once |theta| >= 2, so float32 stays exact. below is the next entry under
    theta (the (k+1)-th largest for integer k). theta is 0 where the row has fewer than ceil(k) finite
    entries (tau is -inf there anyway).
    """
    n = z.shape[-1]
    z_sorted = torch.sort(z, dim=-1).values
    kth_index = (n - k.ceil().long()).clamp(0, n - 1).unsqueeze(-1)
    theta = z_sorted.gather(-1, kth_index).squeeze(-1)
    below = z_sorted.gather(-1, (kth_index - 1).clamp(min=0)).squeeze(-1)
    theta = torch.where(theta > -torch.inf, theta, torch.zeros_like(theta))
    y = torch.where(z > -torch.inf, (z - theta.unsqueeze(-1)).clamp(-2, 2), -torch.inf)
    return y, theta, below


def threshold_last(z: Tensor, k: Tensor) -> Tensor:
    """tau for z [..., n] and k [...] (validated, compute dtype) -> [...]; -inf where k >= #finite."""
    return _relative_threshold(z, k)[2]


def _relative_threshold(z: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For z [..., n] and k [...] (validated, compute dtype): (y [..., n], tau_y [...], tau [...]).

    p = clip(y - tau_y, 0, 1) exactly (y from `_relative`); tau is the threshold in z's units, rounded
    there. Both thresholds are -inf where k >= #finite.
    """
    y, theta, below = _relative(z, k)
    tau_y, flat = _threshold_core(y, k)
    # Flat f: the midpoint of the true interval [z_(k+1), theta - 1], not of the clamped one; halves first
    # so that +-3e38 does not overflow.
    tau = torch.where(flat, 0.5 * below + 0.5 * (theta - 1), theta + tau_y)
    return y, tau_y, torch.where(tau_y > -torch.inf, tau, tau_y)


def _threshold_core(z: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """tau for z [..., n] and k [...] -> (tau, flat), both [...]; tau is -inf where k >= #finite and flat
    marks the rows where f == k on a whole interval (tau is then its midpoint)."""
    n = z.shape[-1]
    finite = z > -torch.inf
    n_finite = finite.sum(-1)

    z_sorted = torch.sort(z, dim=-1).values.contiguous()                  # ascending, -inf first
    csum = torch.cumsum(torch.where(z_sorted > -torch.inf, z_sorted, 0), dim=-1)
    csum = torch.nn.functional.pad(csum, (1, 0))                          # csum[..., r] = sum of r smallest

    def count_le(t: Tensor) -> Tensor:
        return torch.searchsorted(z_sorted, t.contiguous(), right=True)  # #{z_i <= t}

    def count_lt(t: Tensor) -> Tensor:
        return torch.searchsorted(z_sorted, t.contiguous(), right=False)  # #{z_i < t}

    # f at every breakpoint t: #{z >= t + 1} + sum over t < z < t + 1 of (z - t).
    breaks = torch.sort(torch.cat([z, z - 1], dim=-1), dim=-1).values   # [..., 2n]
    lo, hi = count_le(breaks), count_lt(breaks + 1)
    f = (n - hi) + (csum.gather(-1, hi) - csum.gather(-1, lo)) - breaks * (hi - lo)
    f = torch.where(breaks > -torch.inf, f, n_finite.unsqueeze(-1).to(f.dtype))

    # f is non-increasing along the sorted breakpoints: the crossing lies after the last one with f >= k.
    j = (f >= k.unsqueeze(-1)).sum(-1, keepdim=True).clamp(1, 2 * n - 1)
    t_a, t_b = breaks.gather(-1, j - 1), breaks.gather(-1, j)
    mid = 0.5 * (t_a + t_b)                                               # strictly inside the linear piece
    n_above = n - count_le(mid)                                           # W = #{z > tau}
    n_ones = n - count_lt(mid + 1)                                        # U = #{z >= tau + 1}
    inside = (z > mid) & (z < mid + 1)
    s_inside = torch.where(inside, z, 0).sum(-1)
    width = (n_above - n_ones).squeeze(-1)
    tau = (s_inside + n_ones.squeeze(-1) - k) / width.clamp(min=1)
    # With integer k and a gap of >= 1 below the k-th largest value theta, f == k on the whole interval
    # [z_(k+1), theta - 1] and the search may stop anywhere in it. Take its midpoint: every entry then sits
    # clearly at 0 or 1, so the backward never mistakes a clipped entry for a free one.
    kth_index = (n - k.round().long()).clamp(0, n - 1).unsqueeze(-1)
    theta = z_sorted.gather(-1, kth_index).squeeze(-1)
    below = z_sorted.gather(-1, (kth_index - 1).clamp(min=0)).squeeze(-1)
    flat = (k == k.round()) & (theta - below >= 1)
    tau = torch.where(flat, 0.5 * (below + theta - 1), tau)
    return torch.where(k >= n_finite, torch.full_like(tau, -torch.inf), tau), flat


def _mask_from_threshold(z: Tensor, tau: Tensor) -> Tensor:
    p = (z - tau.unsqueeze(-1)).clamp(0, 1)
    return torch.where(z > -torch.inf, p, 0)  # -inf - (-inf) is NaN; such entries get no mass


class _SparseKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, k: Tensor) -> Tensor:
        y, tau_y, _ = _relative_threshold(z, k)
        p = _mask_from_threshold(y, tau_y)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: Tensor):
        (p,) = ctx.saved_tensors
        free = ((p > 0) & (p < 1)).to(grad_p.dtype)                      # S: the unclipped entries
        n_free = free.sum(-1, keepdim=True).clamp(min=1)
        mean_free = (grad_p * free).sum(-1, keepdim=True) / n_free
        return free * (grad_p - mean_free), None


class _ThresholdFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, k: Tensor) -> Tensor:
        y, tau_y, tau = _relative_threshold(z, k)
        ctx.save_for_backward(y, tau_y)
        return tau

    @staticmethod
    def backward(ctx, grad_tau: Tensor):
        y, tau_y = ctx.saved_tensors
        shifted = y - tau_y.unsqueeze(-1)  # relative: the free set is exact even when tau rounds in z's units
        free = ((shifted > 0) & (shifted < 1)).to(grad_tau.dtype)
        n_free = free.sum(-1, keepdim=True).clamp(min=1)
        return free * (grad_tau.unsqueeze(-1) / n_free), None


def sparsek(z: Tensor, k, dim: int = -1) -> Tensor:
    """SPARSEK mask: the projection of z onto {p : 0 <= p <= 1, sum p = k} along `dim`.

    Args:
        z: scores, any shape [..., n, ...] with n along `dim`; float16/bfloat16 are computed in float32.
            -inf entries are allowed and get 0; NaN and +inf are errors.
        k: budget, a positive Python number or a real tensor broadcastable to z's shape without `dim`,
            or to z's shape with `dim` kept as size 1 (a keepdim=True reduction). Non-integer k is allowed;
            k >= (number of finite entries) gives all ones. bool, None and strings are a ValueError.
        dim: the dimension to project along, an int.

    Returns:
        p, same shape and dtype as z, with values in [0, 1] summing to min(k, #finite) along `dim`.
        Its gradient is the closed form 1_S * (g - mean_S(g)), S = {i : 0 < p_i < 1}; k gets no gradient.
    """
    z_last, k_t, dim = _prepare(z, k, dim)
    if z.requires_grad:
        z_last = z.movedim(dim, -1).to(z_last.dtype)
    p = _SparseKFunction.apply(z_last, k_t)
    return p.movedim(-1, dim).to(z.dtype)


def sparsek_threshold(z: Tensor, k, dim: int = -1) -> Tensor:
    """The SPARSEK threshold tau with sparsek(z, k) = clip(z - tau, 0, 1).

    Args: as for `sparsek`.

    Returns:
        tau, z's shape with `dim` removed, z's dtype; -inf where k >= the number of finite entries.
        Its gradient w.r.t. z is 1_S / |S| (the free entries share a unit shift equally).
    """
    z_last, k_t, dim = _prepare(z, k, dim)
    if z.requires_grad:
        z_last = z.movedim(dim, -1).to(z_last.dtype)
    return _ThresholdFunction.apply(z_last, k_t).to(z.dtype)
