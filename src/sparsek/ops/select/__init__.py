"""Causal prefix selection: per-query thresholds and per-key selection ranges."""

from .prefix import Selection, best_first_order, prefix_selection

__all__ = ["Selection", "best_first_order", "prefix_selection"]
