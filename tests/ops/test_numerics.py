"""Numerical edge cases that used to fail silently: large or far-apart scores in SPARSEK and the prefix
selection, and non-finite values leaking through masked products in the reference attention."""

from __future__ import annotations

import pytest
import torch

import sparsek
from sparsek.ops import prefix_selection
from sparsek.ops.attention.reference import sparsek_attention_reference
from sparsek.ops.select.prefix import select_rows

# ---------------------------------------------------------------------------------------------
# SPARSEK operator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset, noise", [(1e8, 1.0), (2e7, 4.0), (8e6, 1.0), (1e4, 1.0), (-3e7, 2.0)])
@pytest.mark.parametrize("k", [1, 2, 3.5])
def test_sparsek_large_offset_float32(offset, noise, k):
    """float32 scores far from 0: the mask sums to k and equals the float64 mask of the same values taken
    relative to their max (shift invariance, so no offset is left to lose)."""
    g = torch.Generator().manual_seed(0)
    z = (offset + noise * torch.randn(4, 8, generator=g)).float()
    p = sparsek.sparsek(z, k)
    expected = sparsek.sparsek(z.double() - z.double().amax(-1, keepdim=True), k)
    torch.testing.assert_close(p.sum(-1), torch.full((4,), float(k)), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=0)


def test_sparsek_extreme_float32():
    """+-3e38 (z - tau overflows in z's units): ties split the budget, order is kept, tau stays finite."""
    z = torch.tensor([[3e38, -3e38, 3e38, -3e38], [3e38, 3e38, -3e38, -3e38], [3e38, -3e38, 0.0, 1.0]])
    p = sparsek.sparsek(z, 1)
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(p, expected, atol=0, rtol=0)
    assert torch.isfinite(sparsek.sparsek_threshold(z, 1)).all()
    torch.testing.assert_close(sparsek.sparsek(z, 2).sum(-1), torch.full((3,), 2.0), atol=0, rtol=0)


def test_sparsek_far_entry_float32():
    """One entry far below the others (1e10 in float32) must not swamp the sums that locate tau."""
    z = torch.tensor([-1e10, 0.3, 0.5, 0.1])
    p = sparsek.sparsek(z, 1)
    expected = sparsek.sparsek(torch.tensor([0.3, 0.5, 0.1], dtype=torch.float64), 1)
    assert p[0] == 0
    torch.testing.assert_close(p[1:].double(), expected, atol=1e-6, rtol=0)


def test_sparsek_gradient_large_offset():
    """The backward's free set and the threshold's gradient do not depend on the offset either."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-8, 9, (8,), generator=g) / 4                    # quarters: exact at 4e6 in float32
    cot = torch.randn(8, generator=g)
    grads = []
    for offset in (0.0, 4e6):
        z = (offset + y).requires_grad_()
        (sparsek.sparsek(z, 3) * cot).sum().backward()
        zt = (offset + y).requires_grad_()
        sparsek.sparsek_threshold(zt, 3).backward()
        grads.append((z.grad, zt.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# prefix selection
# ---------------------------------------------------------------------------------------------


def _prefix_mask_sums(u: torch.Tensor, tau: torch.Tensor, topk: int, window: int) -> torch.Tensor:
    """sum over the candidates C_i of clip(u_j - tau_i, 0, 1), for the queries with more than topk of them,
    in float64 from one row u [T] and its tau [T]."""
    t_len = u.shape[0]
    i = torch.arange(t_len)[:, None]
    candidate = torch.arange(t_len)[None] <= i - window
    m = torch.where(candidate, (u.double()[None] - tau.double()[:, None]).clamp(0, 1), 0)
    return m.sum(1)[window + topk:]


SELECTION_BACKENDS = ["reference", "native"]   # the rule's statement and its CPU twin


@pytest.mark.parametrize("outlier", [3e38, -3e38, 1e12])
@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_prefix_far_outlier(outlier, backend):
    """One score far from the rest (float32) must not swamp the float64 sums of the thresholds."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 40, 1, generator=g)
    u[0, 3, 0] = outlier
    sel = prefix_selection(u, 3, 2, backend=backend)
    sums = _prefix_mask_sums(u[0, :, 0], sel.tau[0, :, 0], 3, 2)
    torch.testing.assert_close(sums, torch.full_like(sums, 3.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_prefix_large_offset_float64(backend):
    """A common offset of 1e12 in float64: the thresholds are found relative to the row, not swamped."""
    g = torch.Generator().manual_seed(0)
    u = 1e12 + torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    sel = prefix_selection(u, 4, 1, backend=backend)
    for b in range(2):
        for h in range(3):
            sums = _prefix_mask_sums(u[b, :, h], sel.tau[b, :, h], 4, 1)
            torch.testing.assert_close(sums, torch.full_like(sums, 4.0), atol=1e-3, rtol=0)


def test_prefix_large_offset_float32_rows_exact():
    """float32 scores near 1e8 are exact in the float64 rows (`select_rows`, the fused path's selection)."""
    g = torch.Generator().manual_seed(0)
    u = (1e8 + torch.randn(2, 30, generator=g)).float()
    tau, _, _ = select_rows(u, 2, 0)
    for r in range(2):
        sums = _prefix_mask_sums(u[r], tau[r], 2, 0)
        torch.testing.assert_close(sums, torch.full_like(sums, 2.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("offset", [8e6, 1e8])
@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_prefix_unrepresentable_tau_raises(offset, backend):
    """float32 cannot hold tau finely enough near 1e7: a clear error, not masks that miss topk."""
    g = torch.Generator().manual_seed(0)
    u = (offset + torch.randn(1, 20, 1, generator=g, dtype=torch.float64)).float()
    with pytest.raises(ValueError, match="scores too large"):
        prefix_selection(u, 2, 0, backend=backend)


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_prefix_extreme_values(backend):
    """+-3e38 in float32: ties split the budget at 3e38 - 0.5, which float32 cannot hold: an error."""
    u = torch.tensor([3e38, -3e38, 3e38, -3e38, 3e38]).view(1, 5, 1)
    with pytest.raises(ValueError, match="scores too large"):
        prefix_selection(u, 1, 0, backend=backend)
    sel = prefix_selection(u[:, :2], 1, 0, backend=backend)             # a gap only: tau is the midpoint
    assert sel.tau[0, 1, 0] == -0.5


# ---------------------------------------------------------------------------------------------
# reference attention
# ---------------------------------------------------------------------------------------------


def _attention_inputs(seed: int = 0, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, D = 2, 4, 2, 8

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return randn(B, T, Hq, D), randn(B, T, Hk, D), randn(B, T, Hk, D), randn(B, T, Hk)


def _rows_attending(scores: torch.Tensor, topk: int, window: int, key: int, batch: int, head: int) -> set[int]:
    sel = prefix_selection(scores, topk, window)
    start, end = int(sel.start[batch, key, head]), int(sel.end[batch, key, head])
    return set(range(start, end)) | set(range(key, min(key + window, scores.shape[1])))


@pytest.mark.parametrize("gate", ["kv", "v", "none"])
@pytest.mark.parametrize("tensor", ["v", "k"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", [11, 4])
def test_attention_non_finite_reaches_only_its_queries(gate, tensor, bad, key):
    """A NaN/inf in k or v of one key makes exactly the outputs of the queries attending that key non-finite
    (for the last key: one query, so 2 of its KV head group's 24 rows); every other row equals the
    output with a finite value there."""
    q, k, v, u = _attention_inputs()
    topk, window, b, h = 2, 2, 1, 0
    poisoned = {"k": k.clone(), "v": v.clone()}
    poisoned[tensor][b, key, h, 3] = bad
    out = sparsek_attention_reference(q, poisoned["k"], poisoned["v"], u, topk=topk, window=window, gate=gate)
    clean = sparsek_attention_reference(q, k, v, u, topk=topk, window=window, gate=gate)

    rows = _rows_attending(u, topk, window, key, b, h)
    group = q.shape[2] // k.shape[2]
    expected = torch.zeros(out.shape[:3], dtype=torch.bool)
    expected[b, sorted(rows), h * group:(h + 1) * group] = True
    finite = torch.isfinite(out).all(-1)
    assert finite[~expected].all(), (~finite).nonzero().tolist()
    torch.testing.assert_close(out[~expected], clean[~expected], atol=1e-12, rtol=0)
    if not (tensor == "k" and bad == float("inf")):  # q.k = -inf would just drop the key from a row
        assert not finite[expected].any(), finite[expected]


def test_attention_non_finite_value_backward():
    """With a NaN value, the loss over the rows that never see it gives finite, clean gradients to the queries
    of those rows (the rows that do see it get NaN there, as autograd's 0 * NaN gives for any NaN output)."""
    q, k, v, u = _attention_inputs(seed=1)
    topk, window, b, h, key = 2, 2, 0, 1, 11
    rows = _rows_attending(u, topk, window, key, b, h)
    group = q.shape[2] // k.shape[2]
    keep = torch.ones(q.shape[:3], dtype=torch.bool)
    keep[b, sorted(rows), h * group:(h + 1) * group] = False

    def grad_q(v_in):
        q_in = q.clone().requires_grad_()
        out = sparsek_attention_reference(q_in, k, v_in, u, topk=topk, window=window, gate="kv")
        out[keep].sum().backward()
        return q_in.grad

    v_bad = v.clone()
    v_bad[b, key, h] = float("nan")
    got, want = grad_q(v_bad), grad_q(v)
    finite = torch.isfinite(got).all(-1)
    assert torch.equal(finite, keep), (~finite).nonzero().tolist()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-12, rtol=0)
