"""Operators: SPARSEK, prefix selection, SparseK attention."""

from .attention import sparsek_attention, sparsek_attention_reference
from .select import Selection, prefix_selection
from .sparsek import sparsek, sparsek_threshold

__all__ = [
    "Selection",
    "prefix_selection",
    "sparsek",
    "sparsek_attention",
    "sparsek_attention_reference",
    "sparsek_threshold",
]
