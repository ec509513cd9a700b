"""The SparseK scoring network: one query-independent importance score per token and KV head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Scorer(nn.Module):
    """u[b, t, h] = x[b, t] . w[:, h] + slope * t, computed and returned in float32 (SPEC section 2).

    The weight starts at zero, so an untrained scorer ranks keys by recency alone; `slope` is a fixed
    hyperparameter (only differences between positions matter, so any offset of t is harmless).
    """

    def __init__(self, d_model: int, n_kv_heads: int, slope: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_kv_heads, d_model))
        self.slope = slope

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, d_model], positions [T] or [B, T] -> scores [B, T, n_kv_heads] float32."""
        with torch.autocast(x.device.type, enabled=False):  # under autocast linear would round u to bf16
            u = nn.functional.linear(x.float(), self.weight.float())
        return u + self.slope * positions.to(torch.float32).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[1]}, n_kv_heads={self.weight.shape[0]}, slope={self.slope}"
