"""Layers built on the operators: the scorer, rotary embedding and the SparseK attention module."""

from .attention import SparseKAttention, SparseKConfig
from .rotary import RotaryEmbedding
from .scorer import Scorer

__all__ = ["RotaryEmbedding", "Scorer", "SparseKAttention", "SparseKConfig"]
