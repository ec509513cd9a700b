"""Evaluation of trained and converted models: perplexity, long-range tasks, the RULER-style suite.

Builds on `sparsek.train` (run loaders, scorer distillation), which never imports it; the held-out loss both use is
`sparsek.heldout`.
"""
