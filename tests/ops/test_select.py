"""prefix_selection (SPEC section 3) against a brute force that builds every C_i and S_i explicitly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsek.ops import prefix_selection
from sparsek.ops.select.blocks import block_key_lists
from tests.reference import best_candidates, candidates, prefix_tau_ref, selection_margin

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_scores(pattern: str, B: int, T: int, H: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Scores [B, T, H]: 'normal' random, 'ties' small integers (many ties, gaps of exactly 1),
    'equal' all the same, 'halves' multiples of 0.5, 'recency' random plus a slope * t term."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "normal":
        u = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    elif pattern == "ties":
        u = torch.randint(-2, 3, (B, T, H), generator=g).double()
    elif pattern == "equal":
        u = torch.full((B, T, H), 0.25, dtype=torch.float64)
    elif pattern == "halves":
        u = torch.randint(-4, 5, (B, T, H), generator=g).double() / 2
    elif pattern == "recency":
        u = torch.randn(B, T, H, generator=g, dtype=torch.float64) + 0.05 * torch.arange(T).double()[:, None]
    else:
        raise ValueError(pattern)
    return u.to(dtype)


def implied_selection(start: np.ndarray, end: np.ndarray, i: int) -> set[int]:
    """Keys selected by query i according to the ranges: {j : start_j <= i < end_j}."""
    return {j for j in range(len(start)) if start[j] <= i < end[j]}


def check_row(u: np.ndarray, tau: np.ndarray, start: np.ndarray, end: np.ndarray, topk: int, window: int):
    """One (b, h) row: start/end ranges, exact selected sets and thresholds versus the brute force."""
    T = len(u)
    # start_j = min(j + w, T), start <= end <= T
    np.testing.assert_array_equal(start, np.minimum(np.arange(T) + window, T))
    assert np.all(end >= start) and np.all(end <= T), (start, end)
    for i in range(T):
        expected = set(best_candidates(u, candidates(i, window), topk))
        got = implied_selection(start, end, i)
        assert got == expected, f"query {i}: selected {sorted(got)}, expected {sorted(expected)}"
    if topk == 0:
        return  # no threshold is defined for an empty budget
    ref = prefix_tau_ref(u, topk, window)
    inf = np.isneginf(ref.tau)
    assert np.array_equal(np.isneginf(tau), inf), (tau, ref.tau)
    fin = ~inf
    # unique solutions: equal to 1e-9; degenerate ones (no fractional entry): inside the solution interval
    assert np.all(tau[fin] >= ref.lo[fin] - 1e-9), (tau[fin], ref.lo[fin])
    assert np.all(tau[fin] <= ref.hi[fin] + 1e-9), (tau[fin], ref.hi[fin])


# The rule's statement and its CPU twin (ops/select/native.c) meet the same brute force.
BACKENDS = ["reference", "native"]


def check_selection(scores: torch.Tensor, topk: int, window: int, backend: str = "reference"):
    sel = prefix_selection(scores, topk, window, backend=backend)
    B, T, H = scores.shape
    for name in ("tau", "start", "end"):
        assert getattr(sel, name).shape == (B, T, H), name
    assert sel.tau.dtype == scores.dtype
    assert sel.start.dtype == torch.int64 and sel.end.dtype == torch.int64
    u = scores.detach().double().numpy()
    tau = sel.tau.detach().double().numpy()
    for b in range(B):
        for h in range(H):
            check_row(u[b, :, h], tau[b, :, h], sel.start[b, :, h].numpy(), sel.end[b, :, h].numpy(), topk, window)
    return sel


# ---------------------------------------------------------------------------------------------
# exhaustive grid
# ---------------------------------------------------------------------------------------------

LENGTHS = [1, 2, 7, 33, 100]


@pytest.mark.parametrize("pattern", ["normal", "ties", "equal"])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("window", [0, 1, 3, "big"])
@pytest.mark.parametrize("topk", [1, 2, 5, "T"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_bruteforce(pattern, T, window, topk, backend):
    """Selected sets (from start/end) equal S_i exactly and tau equals the brute-force threshold."""
    window = T + 4 if window == "big" else window
    topk = T if topk == "T" else topk
    scores = make_scores(pattern, 2, T, 3, seed=T * 31 + window * 7 + topk)
    check_selection(scores, topk, window, backend)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("window", [0, 1, 3, 40])
def test_topk_zero_selects_nothing(T, window):
    """topk = 0: no key is ever selected (end_j == start_j)."""
    scores = make_scores("normal", 2, T, 2, seed=T)
    sel = prefix_selection(scores, 0, window)
    start = np.minimum(np.arange(T) + window, T)
    for b in range(2):
        for h in range(2):
            np.testing.assert_array_equal(sel.start[b, :, h].numpy(), start)
    assert torch.equal(sel.end, sel.start)


@pytest.mark.parametrize("topk", [40, 100, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_at_least_T(topk, backend):
    """topk >= T: every candidate stays selected forever (end_j = T) and tau is -inf everywhere."""
    T = 40
    scores = make_scores("normal", 1, T, 2, seed=1)
    for window in (0, 2):
        sel = check_selection(scores, topk, window, backend)
        assert torch.all(sel.end == T)
        assert torch.all(torch.isneginf(sel.tau))


@pytest.mark.parametrize("pattern", ["halves", "recency"])
@pytest.mark.parametrize("topk,window", [(1, 0), (3, 2), (8, 5), (16, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_patterns(pattern, topk, window, backend):
    """Half-integer ties (breakpoints coincide) and recency-biased scores."""
    scores = make_scores(pattern, 2, 64, 2, seed=topk + 10 * window)
    check_selection(scores, topk, window, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype(dtype):
    """float32 scores give float32 tau; the selection (an order statistic) is still exact."""
    scores = make_scores("normal", 2, 50, 2, seed=5, dtype=dtype)
    sel = prefix_selection(scores, 4, 2)
    assert sel.tau.dtype == dtype
    u = scores.double().numpy()
    for b in range(2):
        for h in range(2):
            for i in range(50):
                got = implied_selection(sel.start[b, :, h].numpy(), sel.end[b, :, h].numpy(), i)
                assert got == set(best_candidates(u[b, :, h], candidates(i, 2), 4))
            ref = prefix_tau_ref(u[b, :, h], 4, 2)
            tau = sel.tau[b, :, h].double().numpy()
            tol = 1e-9 if dtype == torch.float64 else 1e-5
            assert np.array_equal(np.isneginf(tau), np.isneginf(ref.tau))
            fin = np.isfinite(ref.tau)
            assert np.all(tau[fin] >= ref.lo[fin] - tol) and np.all(tau[fin] <= ref.hi[fin] + tol)


@given(
    T=st.integers(1, 24),
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    topk=st.integers(0, 26),
    window=st.integers(0, 26),
    pattern=st.sampled_from(["normal", "ties", "equal", "halves", "recency"]),
    seed=st.integers(0, 10_000),
    backend=st.sampled_from(BACKENDS),
)
def test_random_configurations(T, B, H, topk, window, pattern, seed, backend):
    """Hypothesis over shapes, budgets, windows, score patterns and backends."""
    check_selection(make_scores(pattern, B, T, H, seed), topk, window, backend)


# ---------------------------------------------------------------------------------------------
# structural properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk,window", [(1, 0), (4, 0), (4, 3), (10, 1)])
def test_tau_monotone(topk, window):
    """tau_i is non-decreasing in i (scores within a range < 1, so the threshold is always unique)."""
    g = torch.Generator().manual_seed(topk)
    scores = 0.9 * torch.rand(2, 120, 3, generator=g, dtype=torch.float64)
    tau = prefix_selection(scores, topk, window).tau
    d = tau[:, 1:] - tau[:, :-1]
    both = torch.isfinite(tau[:, 1:]) & torch.isfinite(tau[:, :-1])
    assert torch.all(d[both] >= -1e-12)
    # once finite, it stays finite
    fin = torch.isfinite(tau).long()
    assert torch.all(fin[:, 1:] >= fin[:, :-1])


def test_selection_ranges_contiguous_and_never_return():
    """A key that leaves S_i never returns: the brute-force sets per key form one contiguous range."""
    scores = make_scores("ties", 1, 60, 1, seed=9)
    u = scores[0, :, 0].numpy()
    topk, window = 3, 2
    sel = prefix_selection(scores, topk, window)
    selected_by = {j: [] for j in range(60)}
    for i in range(60):
        for j in best_candidates(u, candidates(i, window), topk):
            selected_by[j].append(i)
    for j, qs in selected_by.items():
        if qs:
            assert qs == list(range(qs[0], qs[-1] + 1))
            assert qs[0] == j + window
            assert int(sel.end[0, j, 0]) == qs[-1] + 1
        else:
            assert int(sel.end[0, j, 0]) == int(sel.start[0, j, 0])


def test_tie_goes_to_newer():
    """Among equal scores the newer (larger index) key wins."""
    scores = torch.zeros(1, 6, 1, dtype=torch.float64)
    sel = prefix_selection(scores, 2, 0)
    # query 5 sees keys 0..5 all tied: the two newest, 4 and 5, are selected
    got = implied_selection(sel.start[0, :, 0].numpy(), sel.end[0, :, 0].numpy(), 5)
    assert got == {4, 5}


def test_heads_and_batches_independent():
    """Each (b, h) row is processed independently: permuting rows permutes the results."""
    scores = make_scores("normal", 3, 20, 4, seed=2)
    sel = prefix_selection(scores, 3, 1)
    perm_b, perm_h = torch.tensor([2, 0, 1]), torch.tensor([3, 1, 0, 2])
    sel_p = prefix_selection(scores[perm_b][:, :, perm_h].contiguous(), 3, 1)
    assert torch.equal(sel_p.end, sel.end[perm_b][:, :, perm_h])
    assert torch.equal(sel_p.tau, sel.tau[perm_b][:, :, perm_h])


def _tau_grad_expected(u: np.ndarray, cot: np.ndarray, topk: int, window: int) -> np.ndarray:
    """sum_i cot_i * d tau_i / d u, with d tau_i / d u_l = 1/|F_i| for the fractional candidates
    F_i = {l in C_i : tau_i < u_l < tau_i + 1} (SPEC 1 and 3b); zero for queries with F_i empty."""
    ref = prefix_tau_ref(u, topk, window)
    expected = np.zeros(len(u))
    for i in range(len(u)):
        if not np.isfinite(ref.tau[i]):
            continue
        c = np.array(candidates(i, window))
        frac = c[(u[c] > ref.tau[i]) & (u[c] < ref.tau[i] + 1)]
        if len(frac):
            expected[frac] += cot[i] / len(frac)
    return expected


def _tau_grad(u: torch.Tensor, topk: int, window: int, seed: int):
    u = u.clone().requires_grad_()
    tau = prefix_selection(u, topk, window).tau
    if not tau.requires_grad:
        pytest.skip("prefix_selection tau is not differentiable")
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(u.shape, generator=g, dtype=torch.float64)
    cot = torch.where(torch.isfinite(tau.detach()), cot, torch.zeros_like(cot))
    (grad,) = torch.autograd.grad(tau, u, cot)
    return grad, cot


@pytest.mark.parametrize("topk,window", [(1, 0), (4, 2), (7, 1)])
@pytest.mark.parametrize("spread", ["narrow", "wide"])
def test_tau_gradient(topk, window, spread):
    """d tau_i / d u_l = 1/|F_i| for the fractional candidates of query i (SPEC 3b), scores far from
    breakpoints. 'narrow': scores in a range < 1, so the threshold is unique everywhere. 'wide': many
    queries have no fractional candidate (tau not unique), where the gradient must be zero."""
    g = torch.Generator().manual_seed(topk)
    T = 30
    for _ in range(200):
        if spread == "narrow":
            u = 0.95 * torch.rand(2, T, 2, generator=g, dtype=torch.float64)
        else:
            u = 3 * torch.randn(2, T, 2, generator=g, dtype=torch.float64)
        if all(selection_margin(u[b, :, h].numpy(), topk, window) > 1e-6 for b in range(2) for h in range(2)):
            break
    else:
        raise AssertionError("no smooth point")
    grad, cot = _tau_grad(u, topk, window, seed=topk)
    for b in range(2):
        for h in range(2):
            expected = _tau_grad_expected(u[b, :, h].numpy(), cot[b, :, h].numpy(), topk, window)
            np.testing.assert_allclose(grad[b, :, h].numpy(), expected, atol=1e-9)


@pytest.mark.parametrize(
    "values,topk",
    [
        ([10.0, 8.0, 1.0, 0.5, -2.0, 3.0], 2),
        ([10.0, 8.0, 1.0, 0.5, -2.0, 3.0], 1),
        ([0.06268684703401436, -4.981950938967438], 1),  # tau lands on u_0 - 1 up to rounding
        ([2.0, -1.0, 0.5], 1),
    ],
)
def test_tau_gradient_zero_without_fractional_entries(values, topk):
    """When no candidate is fractional (a gap >= 1 at the k-th value) tau is not unique and its
    gradient is zero (SPEC section 1: S empty gives zero gradient)."""
    u = torch.tensor(values, dtype=torch.float64)[None, :, None]
    ref = prefix_tau_ref(u[0, :, 0].numpy(), topk, 0)
    assert np.all(ref.degenerate | np.isneginf(ref.tau))
    grad, _ = _tau_grad(u, topk, 0, seed=0)
    np.testing.assert_array_equal(grad.numpy(), np.zeros_like(grad.numpy()))


@pytest.mark.parametrize("pattern,topk,window,block", [
    ("normal", 5, 3, 4), ("ties", 7, 0, 8), ("equal", 4, 2, 1), ("recency", 3, 9, 4), ("halves", 50, 1, 16),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])   # auto: native.c on the CPU
def test_block_lists_hold_each_blocks_selection_in_filled_slots(pattern, topk, window, block, backend):
    """block_key_lists: the list of block b holds exactly the keys selected by its first query i0, and before
    topk candidates exist they fill slots 0, 1, ... in order, as the fused kernels assume when they skip the
    slots past min(K, i0 - window + 1)."""
    t_len = 40
    scores = make_scores(pattern, 2, t_len, 3, seed=topk + window)
    sel = prefix_selection(scores, topk, window)
    start, end = (x.permute(0, 2, 1).reshape(6, t_len) for x in (sel.start, sel.end))
    lists = block_key_lists(start, end, topk, block, backend=backend)
    assert torch.equal(lists, block_key_lists(start, end, topk, block))
    n_slots = min(topk, t_len)
    for b in range(lists.shape[1]):
        i0 = b * block
        filled = min(n_slots, max(0, i0 - window + 1))
        expected_filled = torch.arange(n_slots) < filled
        for r in range(6):
            keys = lists[r, b]
            assert torch.equal(keys >= 0, expected_filled)
            selected = {j for j in range(t_len) if start[r, j] <= i0 < end[r, j]}
            assert set(keys[keys >= 0].tolist()) == selected


def test_prefix_selection_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        prefix_selection(torch.randn(1, 8, 2), 2, 1, backend="gather")
