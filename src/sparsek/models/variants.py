"""The attention variants of `TransformerLM`, one entry each. The model, the CLI's choices and help, and the
benchmarks read this table; adding a baseline is one function and one entry in VARIANTS.

Every variant shares the projections, the rest of the model and the training code; only which keys a query sees
differs. The sparse variants get the same budget of `budget` keys per query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..baselines import fixed_attention, full_attention, hash_attention, window_attention


@dataclass(frozen=True)
class Variant:
    """summary: one line for docs and --help. attend(layer, q [B, T, Hq, D], k, v [B, T, Hk, D]) -> [B, T, Hq, D]
    for the baselines, with the layer's LMConfig as layer.lm_config; None for the SparseK variants, which
    attend through the SparseK layer (scores, selection, cache). buffers(config) -> fixed tensors the variant
    keeps in each layer (saved with the model)."""

    summary: str
    attend: Callable | None = None
    buffers: Callable[..., dict[str, Tensor]] | None = None

    @property
    def sparsek(self) -> bool:
        return self.attend is None


def _full(layer, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return full_attention(q, k, v)


def _window(layer, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return window_attention(q, k, v, layer.lm_config.budget)


def _fixed(layer, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return fixed_attention(q, k, v, *layer.lm_config.fixed_pattern())


def _hash(layer, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return hash_attention(q, k, v, layer.rotations, layer.lm_config.hash_buckets()[0])


def _hash_rotations(config) -> dict[str, Tensor]:
    # Fixed random rotations, saved with the model so that evaluation hashes as training did.
    return {"rotations": torch.randn(config.n_kv_heads, config.head_dim, config.hash_buckets()[1])}


# Module-level functions, not lambdas: a model holding its Variant must pickle (torch.save of a whole model).
VARIANTS: dict[str, Variant] = {
    "full": Variant("dense causal attention (SDPA)", _full),
    "window": Variant("the `budget` newest keys", _window),
    "fixed": Variant("Child et al. 2019: a local band of budget / 2 plus strided summary columns", _fixed),
    "hash": Variant("Reformer-style LSH (Kitaev et al. 2020): a query sees its hash chunk and the one before",
                    _hash, _hash_rotations),
    "sparsek": Variant("SparseK: the `budget` best keys by a learned score (no window)"),
    "sparsek_window": Variant("SparseK plus a sliding window: topk = budget / 2, window = budget - topk"),
}

ATTENTIONS = tuple(VARIANTS)   # the built-in names; validation reads VARIANTS, so a registered one counts too


def describe() -> str:
    """The variants, one per line, for --help."""
    return "\n".join(f"  {name:<15} {variant.summary}" for name, variant in VARIANTS.items())
