"""The SparseK scoring network: one query-independent importance score per token and KV head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The scorer's recency slope u = x . w + slope * t, by use. Every entry point takes its default from here; the
# values differ because the uses want different things from an untrained (zero-weight) scorer. With slope s the
# SPARSEK mask of a zero scorer ramps over about 1 / s keys at the threshold, and only keys on that ramp get a
# gradient; at s >= 1 the mask is exactly 0 or 1 (the newest keys) and gives no gradient; at s = 0 every score
# ties and the distilled content alone ranks the keys; s < 0 keeps the oldest keys (attention sinks, the prompt).
SLOPE_TRAIN = 0.01       # training from scratch (SparseKConfig, LMConfig): a wide ramp while the scorer learns
SLOPE_FINETUNE = 0.1     # fine-tuning a converted model (FinetuneConfig): a ramp of about 10 keys
SLOPE_CONVERT = 1.0      # convert() used as it is: a hard recency mask
SLOPE_DISTILL = 0.0      # distillation (DistillConfig, eval.farcontext): content alone ranks
SLOPE_GENERATE = -1.0    # `sparsek generate` without training: keep the first tokens, which reads fluently


class Scorer(nn.Module):
    """u[b, t, h] = x[b, t] . w[:, h] + slope * t (+ sink_bias[t, h] for t < sinks), computed and returned in
    float32 (SPEC section 2).

    The weight starts at zero, so an untrained scorer ranks keys by recency alone; `slope` is a fixed
    hyperparameter (only differences between positions matter, so any offset of t is harmless). With sinks > 0
    the positions t < sinks get a learned bias of their own (zero at first), so that a pretrained model's
    attention sinks can rank first; there t is absolute, so a left-padded batch must pass positions that count
    from each row's first real token (transformers' generate() does; a bare forward with a padding mask and no
    position_ids does not).
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
