"""Benchmarks: `python -m sparsek.bench.<name>`; each prints a table last."""
