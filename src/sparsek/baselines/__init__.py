"""Sparse-attention baselines for comparison with SparseK: dense, sliding window, fixed (Sparse Transformer), LSH."""

from .attention import (
    fixed_attention,
    fixed_mask,
    full_attention,
    hash_attention,
    hash_mask,
    window_attention,
    window_mask,
)

__all__ = [
    "fixed_attention",
    "fixed_mask",
    "full_attention",
    "hash_attention",
    "hash_mask",
    "window_attention",
    "window_mask",
]
