"""A small decoder language model whose attention is chosen by config, for training from scratch and comparing.

Pre-norm blocks (RMSNorm), rotary embeddings, grouped-query attention, a SwiGLU MLP and tied embeddings. The
attention variants (full, window, fixed, hash, sparsek, sparsek_window) are listed in models/variants.py.

Shape legend: B batch, T tokens, V vocabulary, Hq / Hk query / KV heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.attention import SparseKAttention, SparseKConfig
from ..layers.scorer import SLOPE_TRAIN
from .variants import VARIANTS


@dataclass
class LMConfig:
    """Model hyperparameters. `budget` (keys per query of the sparse variants) and `context` (the training
    context, which sets the fixed pattern's stride and the number of hash buckets) matter only to sparse variants.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    mlp_hidden: int | None = None  # default: 8/3 d_model rounded up to a multiple of 64
    attention: str = "sparsek_window"
    budget: int = 64
    context: int = 512
    gate: str = "kv"
    slope: float = SLOPE_TRAIN
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.attention not in VARIANTS:
            raise ValueError(f"attention must be one of {tuple(VARIANTS)}, got {self.attention!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"need d_model % n_heads == 0 and n_heads % n_kv_heads == 0, got {self.d_model}, "
                             f"{self.n_heads}, {self.n_kv_heads}")
        if self.attention != "full" and not 2 <= self.budget:
            raise ValueError(f"budget must be >= 2 keys per query, got {self.budget}")
        if VARIANTS[self.attention].sparsek and not 0 <= self.slope < 1:
            # The scorer starts at zero: with integer positions and slope >= 1 the mask is exactly 0 or 1.
            raise ValueError(f"slope must lie in [0, 1) for the scorer to get gradients, got {self.slope}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def sparsek_budget(self) -> tuple[int, int]:
        """(topk, window) of the SparseK variants."""
        if self.attention == "sparsek":
            return self.budget, 0
        topk = self.budget // 2
        return topk, self.budget - topk

    def fixed_pattern(self) -> tuple[int, int]:
        """(local, stride) of the fixed pattern: budget / 2 local keys, and budget - local summary columns at the
        last position of the training context."""
        local = self.budget // 2
        return local, max(1, math.ceil(self.context / (self.budget - local)))

    def hash_buckets(self) -> tuple[int, int]:
        """(chunk, rotations): chunks of budget / 2 keys (a query sees two), about one bucket per chunk."""
        chunk = self.budget // 2
        return chunk, max(1, self.context // chunk // 2)


class Attention(SparseKAttention):
    """Causal self-attention of one block; the variant is `config.attention` (models/variants.py).

    forward(x [B, T, d_model]) -> [B, T, d_model]. Positions are 0..T-1 (one sequence per row). The SparseK
    variants are the SparseK layer itself (prefill and step included); the baselines share its projections and
    rotary embedding and attend through their VARIANTS entry.
    """

    def __init__(self, config: LMConfig):
        self.variant = VARIANTS[config.attention]
        topk, window = config.sparsek_budget() if self.variant.sparsek else (0, 1)   # (unused by the baselines)
        super().__init__(SparseKConfig(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, topk,
                                       window, config.gate, config.slope, rope_theta=config.rope_theta))
        self.lm_config = config
        if not self.variant.sparsek:
            self.scorer = None
        for name, tensor in (self.variant.buffers(config) if self.variant.buffers else {}).items():
            self.register_buffer(name, tensor)

    def forward(self, x: Tensor) -> Tensor:
        if self.variant.sparsek:
            return super().forward(x)
        q, k, v = self.project(x, torch.arange(x.shape[1], device=x.device))
        return self.o_proj(self.variant.attend(self, q, k, v).flatten(2))

    def _cached(self, x: Tensor, positions: Tensor, cache):
        if not self.variant.sparsek:
            raise ValueError(f"{self.lm_config.attention!r} attention has no SparseK cache (prefill and step)")
        return super()._cached(x, positions, cache)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model)
        self.mlp = MLP(config.d_model, config.mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """Decoder-only language model: ids [B, T] -> logits [B, T, V]."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.apply(self._init_weights)
        for block in self.blocks:  # residual branches scaled down with depth (GPT-2)
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> Tensor:
        """ids [B, T] int64 -> logits [B, T, V] (float32 under autocast too); with targets [B, T], the
        cross-entropy of each target instead, [B, T] float32."""
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self._logits(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    def _logits(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(x), self.embed.weight).float()   # tied input and output embeddings

    def token_losses(self, tokens: Tensor) -> Tensor:
        """tokens [B, T + 1] -> cross-entropy of predicting tokens[:, 1:] from the prefix, [B, T] float32."""
        return self(tokens[:, :-1], tokens[:, 1:])

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue ids [B, T] by sampling (temperature 0: greedy) -> [B, T + max_new_tokens].

        The SparseK variants decode with one `SparseKCache` per layer: memory stays constant however long the
        text grows. The other variants recompute the whole prefix for every token (fine for short samples).
        """
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must be [B, T] with T >= 1, got {tuple(ids.shape)}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if VARIANTS[self.config.attention].sparsek:
            return self._generate_cached(ids, max_new_tokens, temperature, top_k, generator)
        for _ in range(max_new_tokens):
            next_id = _sample(self(ids)[:, -1], temperature, top_k, generator)
            ids = torch.cat([ids, next_id], dim=1)
        return ids

    def _generate_cached(self, ids, max_new_tokens, temperature, top_k, generator) -> Tensor:
        x = self.embed(ids)
        caches = []
        for block in self.blocks:
            out, cache = block.attn.prefill(block.attn_norm(x))
            caches.append(cache)
            x = x + out
            x = x + block.mlp(block.mlp_norm(x))
        pieces = [ids]
        for position in range(ids.shape[1], ids.shape[1] + max_new_tokens):
            next_id = _sample(self._logits(x[:, -1]), temperature, top_k, generator)
            pieces.append(next_id)
            x = self.embed(next_id)
            for block, cache in zip(self.blocks, caches):
                x = x + block.attn.step(block.attn_norm(x), position, cache)
                x = x + block.mlp(block.mlp_norm(x))
        return torch.cat(pieces, dim=1)


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] -> next ids [B, 1]."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
