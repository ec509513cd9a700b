"""Small decoder language models for training from scratch (`sparsek train`)."""

from .lm import ATTENTIONS, LMConfig, TransformerLM

__all__ = ["ATTENTIONS", "LMConfig", "TransformerLM"]
