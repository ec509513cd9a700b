"""Small decoder language models for training from scratch (`sparsek train`)."""

from .lm import LMConfig, TransformerLM
from .variants import ATTENTIONS, VARIANTS

__all__ = ["ATTENTIONS", "VARIANTS", "LMConfig", "TransformerLM"]
