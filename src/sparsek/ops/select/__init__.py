"""Causal prefix selection: per-query thresholds and per-key selection ranges."""

from .prefix import Selection, check_budget, prefix_selection

__all__ = ["Selection", "check_budget", "prefix_selection"]
