"""Causal prefix selection: per-query thresholds and per-key selection ranges."""

from .prefix import Selection, prefix_selection

__all__ = ["Selection", "prefix_selection"]
