"""SparseK attention: the exact reference and the public dispatching function."""

from .interface import sparsek_attention
from .reference import sparsek_attention_reference

__all__ = ["sparsek_attention", "sparsek_attention_reference"]
