"""The SparseK scoring network: one query-independent importance score per token and KV head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Scorer(nn.Module):
    """u[b, t, h] = x[b, t] . w[:, h] + slope * t (+ sink_bias[t, h] for t < sinks), computed and returned in
    float32 (SPEC section 2).

    The weight starts at zero, so an untrained scorer ranks keys by recency alone; `slope` is a fixed
    hyperparameter (only differences between positions matter, so any offset of t is harmless). With sinks > 0
    the first `sinks` positions get a learned bias of their own (zero at first): a pretrained model's attention
    sinks can then rank first without the shared weight spending its capacity on them.
    """

    def __init__(self, d_model: int, n_kv_heads: int, slope: float, sinks: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_kv_heads, d_model))
        self.slope = slope
        self.sinks = sinks
        if sinks:
            self.sink_bias = nn.Parameter(torch.zeros(sinks, n_kv_heads))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, d_model], positions [T] or [B, T] -> scores [B, T, n_kv_heads] float32."""
        with torch.autocast(x.device.type, enabled=False):  # under autocast linear would round u to bf16
            u = nn.functional.linear(x.float(), self.weight.float())
        u = u + self.slope * positions.to(torch.float32).unsqueeze(-1)
        if self.sinks:
            sink = (positions >= 0) & (positions < self.sinks)
            bias = self.sink_bias.float()[positions.clamp(0, self.sinks - 1)]          # [..., T, n_kv_heads]
            u = u + torch.where(sink.unsqueeze(-1), bias, 0.0)
        return u

    def extra_repr(self) -> str:
        sinks = f", sinks={self.sinks}" if self.sinks else ""
        return f"d_model={self.weight.shape[1]}, n_kv_heads={self.weight.shape[0]}, slope={self.slope}{sinks}"
