"""Rotary position embedding (RoFormer), in the half-split layout used by Llama-family checkpoints."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotates pairs (x[..., i], x[..., i + D/2]) of each head by position * theta ** (-2i / D)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, H, D], positions [T] or [B, T] (integers) -> x rotated, same shape and dtype."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq      # [(B,) T, D/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(-2)            # [(B,) T, 1, D]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)
