"""The SPARSEK operator: a differentiable top-k mask (projection onto the capped simplex), and the same threshold
over a decode cache's kept scores (kept.py, with its Triton kernel)."""

from .kept import kept_threshold
from .reference import sparsek, sparsek_threshold

__all__ = ["kept_threshold", "sparsek", "sparsek_threshold"]
