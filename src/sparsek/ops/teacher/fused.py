"""Host side of the teacher-mass kernels: allocation, launches (see kernels.py; ops/common/tiles.py picks their
tiles)."""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ..common import tiles
from .kernels import teacher_column_kernel, teacher_lse_kernel


def teacher_mass_triton(q: Tensor, k: Tensor, *, window: int, reduction: str = "mean",
                        scale: float | None = None) -> Tensor:
    """q [B, T, Hq, D], k [B, T, Hk, D] -> [B, T, Hk] float32; the same numbers as `teacher_mass_reference`."""
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    q, k = q.contiguous(), k.to(q.dtype).contiguous()
    dot = "ieee" if q.dtype == torch.float32 else "tf32"
    tile = tiles.teacher(tiles.target(q.device), head_dim)
    qk_scale2 = scale * math.log2(math.e)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    lse = torch.empty(batch * n_q_heads, t_len, dtype=torch.float32, device=q.device)
    teacher_lse_kernel[(triton.cdiv(t_len, tile["BLOCK_M"]), batch * n_q_heads)](
        q, k, lse, t_len, *strides, qk_scale2, N_Q_HEADS=n_q_heads, GROUP=group, HEAD_DIM=head_dim, DOT=dot, **tile)
    col_sum = torch.full((batch, t_len, n_kv_heads), float("nan"), dtype=torch.float32, device=q.device)
    col_max = torch.full_like(col_sum, float("nan"))
    teacher_column_kernel[(triton.cdiv(t_len, tile["BLOCK_N"]), batch * n_kv_heads)](
        q, k, lse, col_sum, col_max, t_len, *strides, qk_scale2, window, N_Q_HEADS=n_q_heads,
        N_KV_HEADS=n_kv_heads, GROUP=group, HEAD_DIM=head_dim, DOT=dot, **tile)
    if reduction == "max":
        return col_max
    if reduction == "sum":
        return col_sum
    seen_by = (t_len - window - torch.arange(t_len, device=q.device)).clamp(min=1) * group
    return col_sum / seen_by[:, None]

