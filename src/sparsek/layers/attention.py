"""SparseKAttention: a drop-in causal self-attention layer with learned sparse selection plus a window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cache import SparseKCache
from ..ops.attention import sparsek_attention
from ..ops.common import check_budget, check_gate
from .rotary import RotaryEmbedding
from .scorer import SLOPE_TRAIN, Scorer


@dataclass
class SparseKConfig:
    """Hyperparameters of one SparseK attention layer.

    d_model: model width. n_heads: query heads. n_kv_heads: key/value heads (GQA; default n_heads).
    head_dim: default d_model // n_heads. topk: selected keys per query. window: sliding-window width.
    gate: "kv", "v" or "none" (see `sparsek_attention`). slope: recency bias added to the scores per position.
    rope / rope_theta: rotary embedding of q and k. bias: biases in the projections.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    topk: int = 64
    window: int = 64
    gate: str = "kv"
    slope: float = SLOPE_TRAIN
    rope: bool = True
    rope_theta: float = 10000.0
    bias: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("d_model", "n_heads", "n_kv_heads") + (("head_dim",) if self.head_dim is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                                 "or head_dim given")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        check_budget(self.topk, self.window)
        check_gate(self.gate)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Positions that restart at 0 in each packed sequence: [N + 1] offsets -> [total] int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def attend(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int, gate: str = "kv",
           scale: float | None = None, cache: SparseKCache | None = None, lengths: Tensor | None = None,
           build_cache: bool = False) -> tuple[Tensor, SparseKCache | None]:
    """How a SparseK layer attends, in parallel or decoding; this layer and the transformers integration both
    call it. q [B, T, Hq, D], k, v [B, T, Hk, D], scores [B, T, Hk] -> (out [B, T, Hq, D], cache).

    cache None: the parallel forward over the T tokens, rows left padded to lengths [B] real tokens (None: all
    real); with build_cache, also the constant-size cache they leave (else None). cache given: the T new tokens
    decoded one at a time through it (it grows in place and is returned), exactly as the forward would.
    """
    if cache is not None:
        outs = [cache.step(q[:, t], k[:, t], v[:, t], scores[:, t], gate=gate, scale=scale)
                for t in range(q.shape[1])]
        return torch.stack(outs, dim=1), cache
    if lengths is None:
        out = sparsek_attention(q, k, v, scores, topk=topk, window=window, gate=gate, scale=scale)
    else:  # pack the real tokens (rows are left padded) and run them as varlen sequences
        t_len = q.shape[1]
        real = torch.arange(t_len, device=q.device) >= (t_len - lengths.to(q.device))[:, None]      # [B, T]
        cu_seqlens = torch.nn.functional.pad(lengths.to(q.device).cumsum(0), (1, 0))
        packed = sparsek_attention(q[real][None], k[real][None], v[real][None], scores[real][None], topk=topk,
                                   window=window, gate=gate, scale=scale, cu_seqlens=cu_seqlens)
        out = q.new_zeros(q.shape)
        out[real] = packed[0]
    if build_cache:
        cache = SparseKCache.prefill(k.detach(), v.detach(), scores.detach(), topk=topk, window=window,
                                     lengths=lengths)
    return out, cache


class SparseKAttention(nn.Module):
    """Causal self-attention whose keys are a learned top-k selection plus a sliding window: the one SparseK
    attention front-end (models/lm.py's layers are this layer).

    forward(x [B, T, d_model], positions=None, cu_seqlens=None) -> [B, T, d_model]. For generation, prefill(x)
    gives the prompt's output and a constant-size `SparseKCache`; step(x, position, cache) attends one new token.
    """

    def __init__(self, config: SparseKConfig):
        super().__init__()
        self.config = c = config
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=c.bias)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta) if c.rope else None
        self.scorer: Scorer | None = Scorer(c.d_model, c.n_kv_heads, c.slope)

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d_model], positions [T] or [B, T] -> q [B, T, Hq, D], k, v [B, T, Hk, D] (rotary applied)."""
        c = self.config
        batch, t_len, _ = x.shape
        q = self.q_proj(x).view(batch, t_len, c.n_heads, c.head_dim)
        k = self.k_proj(x).view(batch, t_len, c.n_kv_heads, c.head_dim)
        v = self.v_proj(x).view(batch, t_len, c.n_kv_heads, c.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.config.d_model}], got shape {tuple(x.shape)}")

    def forward(self, x: Tensor, positions: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        """x [B, T, d_model]; positions [T] or [B, T] (default 0..T-1, or restarting per packed sequence);
        cu_seqlens [N + 1] for B = 1 packed sequences."""
        c = self.config
        self._check(x)
        batch, t_len, _ = x.shape
        if positions is None:
            positions = (positions_from_cu_seqlens(cu_seqlens, t_len) if cu_seqlens is not None
                         else torch.arange(t_len, device=x.device))
        q, k, v = self.project(x, positions)
        scores = self.scorer(x, positions)                                   # [B, T, Hk] float32
        out = sparsek_attention(q, k, v, scores, topk=c.topk, window=c.window, gate=c.gate,
                                cu_seqlens=cu_seqlens)                        # [B, T, Hq, D]
        return self.o_proj(out.reshape(batch, t_len, c.n_heads * c.head_dim))

    def prefill(self, x: Tensor) -> tuple[Tensor, SparseKCache]:
        """A prompt x [B, T, d_model] at positions 0..T-1 -> (its output [B, T, d_model], the constant-size cache
        it leaves for `step`)."""
        return self._cached(x, torch.arange(x.shape[1], device=x.device), None)

    def step(self, x: Tensor, position: int, cache: SparseKCache) -> Tensor:
        """One new token x [B, 1, d_model] at `position`, attending through `cache` (which it extends) ->
        [B, 1, d_model]; equal to the forward's row at that position."""
        return self._cached(x, torch.tensor([position], device=x.device), cache)[0]

    def _cached(self, x: Tensor, positions: Tensor, cache: SparseKCache | None) -> tuple[Tensor, SparseKCache]:
        c = self.config
        self._check(x)
        q, k, v = self.project(x, positions)
        out, cache = attend(q, k, v, self.scorer(x, positions), topk=c.topk, window=c.window, gate=c.gate,
                            cache=cache, build_cache=True)
        return self.o_proj(out.flatten(2)), cache
