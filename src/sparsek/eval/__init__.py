"""Evaluation of trained and converted models: perplexity on held-out text."""
