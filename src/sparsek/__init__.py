"""sparsek: trainable sparse attention (SparseK, arXiv 2406.16747) for long-context decoder Transformers."""

from .cache import SparseKCache
from .layers import Scorer, SparseKAttention, SparseKConfig
from .ops import Selection, prefix_selection, sparsek, sparsek_attention, sparsek_threshold

__version__ = "0.1.0"

__all__ = [
    "Scorer",
    "Selection",
    "SparseKAttention",
    "SparseKCache",
    "SparseKConfig",
    "prefix_selection",
    "sparsek",
    "sparsek_attention",
    "sparsek_threshold",
]
