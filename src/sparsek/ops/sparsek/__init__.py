"""The SPARSEK operator: a differentiable top-k mask (projection onto the capped simplex)."""

from .reference import sparsek, sparsek_threshold

__all__ = ["sparsek", "sparsek_threshold"]
