"""The SPARSEK threshold of a decode cache's kept candidate scores, in one Triton kernel.

Shape legend: B batch, H KV heads, C capacity of the kept-score buffer (finite scores at any columns, -inf
elsewhere).

tau solves f(tau) = sum_i clip(z_i - tau, 0, 1) = k (SPEC section 1); f is continuous, non-increasing and
piecewise linear with breakpoints {z_i} and {z_i - 1}. The reference sorts the row and evaluates f at every
breakpoint, which on a GPU is about a hundred small launches per decode step. The kernel instead keeps one
program per (batch row, KV head) and searches a bracket [lo, hi] with f(lo) >= k > f(hi), starting from
[min z - 2, max z]. Each probe p is one pass over the row giving f(p), the slopes of f just left and right of
p and the distances to the neighbouring breakpoints; so the root of each adjacent linear piece is known in
closed form, and when it falls inside its piece it is tau (certified, the loop ends). The next probe is that
root (Newton on the current piece), a bisection midpoint if it leaves the bracket, and bisection only after
NEWTON_ITERS probes, which bounds the work on adversarial rows: the bracket then halves down to adjacent
doubles. In a NumPy model of the kernel, 4100-entry rows of normal scores took about 5 probes (at most 9),
integers 2 to 4, scores spread over 16 decades about 17.

Where f is flat at k (integer k with a gap of at least 1 under the k-th largest value theta) every point of
[z_(k+1), theta - 1] solves it; like the reference the kernel returns the midpoint, from the exact k-th and
(k+1)-th largest values found by one last pass. That pass is skipped when the certified root lies well inside
its linear piece, where f crosses k strictly and so cannot be flat. No host synchronisation and no
data-dependent shapes: it can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..common import interpreting, tiles
from .reference import threshold_last

try:
    from . import kernels
except ImportError:  # triton is an optional extra: kept_threshold falls back to the reference
    kernels = None

__all__ = ["kept_threshold", "kept_threshold_reference", "kept_threshold_triton"]

# Newton probes before the search falls back to bisection, and the cap on all probes: after NEWTON_ITERS,
# 64 halvings of [min - 2, max] leave a bracket narrower than 2^-64 of it (adjacent doubles, in practice).
NEWTON_ITERS = 16
MAX_ITERS = NEWTON_ITERS + 66


def kept_threshold_triton(kept_u: Tensor, k: int, *, block: int | None = None) -> Tensor:
    """Triton twin of `kept_threshold` (inputs already validated). block: entries per chunk (tests force
    small chunks to exercise the chunk loop)."""
    batch, n_heads, n_columns = kept_u.shape
    z = kept_u.contiguous()
    tau = torch.empty((batch, n_heads), dtype=torch.float64, device=kept_u.device)
    if tau.numel() == 0:
        return tau
    if n_columns == 0:
        return tau.fill_(-torch.inf)
    chunks = tiles.threshold(tiles.target(z.device), n_columns)
    if block is not None:
        chunks["BLOCK"] = block
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        kernels.kept_threshold_kernel[(batch * n_heads,)](
            z, tau, n_columns, k, NEWTON_ITERS=NEWTON_ITERS, MAX_ITERS=MAX_ITERS, **chunks)
    return tau


def kept_threshold(kept_u: Tensor, k: int) -> Tensor:
    """SPARSEK threshold of each row of a kept-score buffer.

    Args:
        kept_u: [B, H, C] float64 scores, -inf marking empty columns (anywhere in the row); no NaN or +inf.
        k: the budget, an int >= 1.

    Returns:
        tau [B, H] float64 with sum_c clip(kept_u[b, h, c] - tau, 0, 1) = k, equal to the reference
        `sparsek_threshold` (to about 1e-12 relative to the scores' magnitude; the midpoint of the solution
        interval where f is flat at k), and -inf where k >= the number of finite entries. Triton on CUDA
        tensors (or CPU tensors under TRITON_INTERPRET=1), the PyTorch reference (`sparsek_threshold`'s core,
        without its checks of the values, which wait for the device and break torch.compile graphs) otherwise.
    """
    if not isinstance(kept_u, Tensor) or kept_u.dim() != 3 or kept_u.dtype != torch.float64:
        raise ValueError(f"kept_u must be a [B, H, C] float64 tensor, got {getattr(kept_u, 'dtype', type(kept_u))} "
                         f"of shape {tuple(getattr(kept_u, 'shape', ()))}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    on_device = kept_u.is_cuda or (interpreting() and kept_u.device.type == "cpu")
    if kernels is not None and on_device:
        return kept_threshold_triton(kept_u, k)
    return kept_threshold_reference(kept_u, k)


def kept_threshold_reference(kept_u: Tensor, k: int) -> Tensor:
    """`kept_threshold` in PyTorch, for inputs already validated: no check waits for the device, so a decode
    step built on it traces into one torch.compile graph."""
    if kept_u.shape[-1] == 0:
        return torch.full(kept_u.shape[:-1], -torch.inf, dtype=torch.float64, device=kept_u.device)
    return threshold_last(kept_u, torch.full(kept_u.shape[:-1], float(k), dtype=torch.float64,
                                             device=kept_u.device))
