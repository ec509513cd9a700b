"""bench.breakdown's effective rates, checked by hand on a tiny row (the benchmark itself needs a GPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from sparsek.bench.breakdown import effective_tflops  # noqa: E402


def test_effective_tflops_counts_the_matmuls_of_each_pass():
    # T = 4 queries, 1 head of dim 1, topk 2, window 1: 4 * 3 pairs, 4 * 2 selected, 4 * 1 in the window.
    # One matmul is 2 FLOPs per pair; the forward does 2, the dq pass 3, the list and band passes 4 each.
    row = {"T": 4, "fwd kernel": 1.0, "bwd dq pass": 2.0, "bwd list pass": 1.0, "bwd band pass": 0.5}
    rates = effective_tflops(row, heads=1, head_dim=1, topk=2, window=1)
    want_flops = {"fwd kernel": 2 * 2 * 12, "bwd dq pass": 3 * 2 * 12, "bwd list pass": 4 * 2 * 8,
                  "bwd band pass": 4 * 2 * 4}
    for name, flops in want_flops.items():
        assert rates[name] == pytest.approx(flops / (row[name] * 1e-3) / 1e12)


def test_effective_tflops_caps_topk_and_window_at_t():
    row = {"T": 4, "fwd kernel": 1.0, "bwd dq pass": 1.0, "bwd list pass": 1.0, "bwd band pass": 1.0}
    capped = effective_tflops(row, heads=2, head_dim=8, topk=100, window=100)
    exact = effective_tflops(row, heads=2, head_dim=8, topk=4, window=4)
    assert capped == pytest.approx(exact)
