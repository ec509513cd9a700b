"""Data: real text that loads offline (`text`)."""

from .text import heldout_tokens, load_text, shakespeare_works, strip_gutenberg

__all__ = ["heldout_tokens", "load_text", "shakespeare_works", "strip_gutenberg"]
