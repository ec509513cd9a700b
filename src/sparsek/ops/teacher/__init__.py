"""The teacher signal of scorer distillation: how much full attention each key receives from the queries that
see it outside their window (reference.py has the definition; kernels.py the Triton version)."""

from __future__ import annotations

from torch import Tensor

from ..common import check_backend, check_budget, kernel_for
from .reference import REDUCTIONS, kept_attention_reference, teacher_mass_reference

try:
    from . import fused
except ImportError:  # triton not installed: the PyTorch path only
    fused = None

__all__ = ["REDUCTIONS", "kept_attention", "teacher_mass"]

kept_attention = kept_attention_reference


def teacher_mass(q: Tensor, k: Tensor, *, window: int, reduction: str = "mean", scale: float | None = None,
                 backend: str = "auto") -> Tensor:
    """Attention mass each key receives from later queries outside their window, per KV head.

    Args:
        q: [B, T, Hq, D] queries as the attention sees them (after RoPE and norms).
        k: [B, T, Hk, D] keys; Hq a multiple of Hk (GQA: a key's mass reduces over its group's query heads).
        window: w >= 0; only queries i >= j + w count for key j (those for which j is a SparseK candidate).
        reduction: "sum", "mean" or "max" over those queries and the group's heads (reference.py).
        scale: softmax scale of q.k; head_dim ** -0.5 when None.
        backend: "auto" (Triton on CUDA, chunked PyTorch elsewhere), "triton" or "reference".

    Returns:
        [B, T, Hk] float32 (float64 from the reference with float64 inputs); 0 for the last w keys.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] \
            or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"need q [B, T, Hq, D] and k [B, T, Hk, D] with Hq a multiple of Hk, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    check_budget(0, window, allow_empty=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_backend(backend, ("auto", "triton", "reference"))
    kernel = kernel_for(backend, fused, "teacher_mass_triton", q)
    if kernel is not None:
        return kernel(q.detach(), k.detach(), window=window, reduction=reduction, scale=scale)
    return teacher_mass_reference(q.detach(), k.detach(), window=window, reduction=reduction, scale=scale)
