"""Property tests of the SPARSEK operator (SPEC section 1) against an independent float64 reference."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import sparsek
from tests.reference import breakpoint_margin, sparsek_ref, sparsemax_ref, tau_bisect

# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

_cont = st.floats(-6.0, 6.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
_tied = st.integers(-3, 3).map(float)  # heavy ties, gaps of exactly 1 (breakpoints)
_quarters = st.integers(-12, 12).map(lambda x: x / 4.0)
values = st.one_of(_cont, _tied, _quarters)
vectors = st.one_of(
    st.lists(values, min_size=1, max_size=12),
    st.lists(_tied, min_size=1, max_size=12),
)
budgets = st.one_of(
    st.integers(1, 13).map(float),
    st.floats(0.05, 13.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def assert_tau_valid(tau: np.ndarray, Z: np.ndarray, k, atol=1e-9):
    """``tau`` solves f(tau) = k: equals the unique reference value, or lies in the solution interval."""
    ref = tau_bisect(Z, k)
    tau = np.asarray(tau, dtype=np.float64).reshape(-1)
    inf = np.isneginf(ref.tau)
    assert np.array_equal(np.isneginf(tau), inf), (tau, ref.tau)
    fin = ~inf
    assert np.all(tau[fin] >= ref.lo[fin] - atol) and np.all(tau[fin] <= ref.hi[fin] + atol), (
        tau[fin],
        ref.lo[fin],
        ref.hi[fin],
    )


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------


@given(z=vectors, k=budgets)
def test_matches_bruteforce_reference(z, k):
    """p equals clip(z - tau, 0, 1) with tau from an independent float64 bisection; tau is a solution."""
    zt = _t(z)
    p = sparsek.sparsek(zt, k)
    tau = sparsek.sparsek_threshold(zt, k)
    assert p.shape == zt.shape and p.dtype == zt.dtype
    assert tau.shape == () and tau.dtype == zt.dtype
    np.testing.assert_allclose(_np(p), sparsek_ref(z, k), atol=1e-9, rtol=0)
    assert_tau_valid(_np(tau), np.array([z]), k)


@given(z=vectors, k=budgets)
def test_sum_equals_k(z, k):
    """sum_i p_i = k whenever k is below the number of entries."""
    assume(k < len(z))
    p = sparsek.sparsek(_t(z), k)
    assert float(p.sum()) == pytest.approx(k, abs=1e-9 * (1 + len(z)))


@given(z=vectors, k=budgets)
def test_values_in_unit_interval(z, k):
    """0 <= p_i <= 1 exactly (no rounding overshoot)."""
    p = sparsek.sparsek(_t(z), k)
    assert bool((p >= 0).all()) and bool((p <= 1).all())


@given(z=vectors, k=budgets)
def test_order_preserving(z, k):
    """z_i > z_j implies p_i >= p_j, and equal scores get equal mass."""
    p = _np(sparsek.sparsek(_t(z), k))
    zz = np.array(z)
    for i in range(len(z)):
        for j in range(len(z)):
            if zz[i] > zz[j]:
                assert p[i] >= p[j] - 1e-12
            elif zz[i] == zz[j]:
                assert abs(p[i] - p[j]) <= 1e-12


@given(z=vectors, k=budgets, c=st.floats(-40, 40, allow_nan=False, allow_subnormal=False))
def test_shift_invariance(z, k, c):
    """SPARSEK(z + c, k) = SPARSEK(z, k) and tau(z + c) = tau(z) + c."""
    zt = _t(z)
    p0 = sparsek.sparsek(zt, k)
    p1 = sparsek.sparsek(zt + c, k)
    # z + c rounds each entry by ~1e-14; breakpoints can amplify that only by O(1) per entry.
    np.testing.assert_allclose(_np(p1), _np(p0), atol=1e-9, rtol=0)
    t0 = sparsek.sparsek_threshold(zt, k)
    t1 = sparsek.sparsek_threshold(zt + c, k)
    if math.isinf(float(t0)):
        assert math.isinf(float(t1)) and float(t1) < 0
    elif not tau_bisect(np.array([z]), k).degenerate[0]:
        assert float(t1) == pytest.approx(float(t0) + c, abs=1e-9)


@given(z=vectors, k=budgets)
def test_idempotent_projection(z, k):
    """p lies in the capped simplex, so projecting it again returns it unchanged."""
    assume(k < len(z))
    p = sparsek.sparsek(_t(z), k)
    np.testing.assert_allclose(_np(sparsek.sparsek(p, k)), _np(p), atol=1e-9, rtol=0)


@given(z=vectors, extra=st.floats(0.0, 5.0, allow_nan=False, allow_subnormal=False))
def test_k_at_least_n_gives_ones(z, extra):
    """k >= n gives all ones and tau = -inf."""
    k = len(z) + extra
    zt = _t(z)
    p = sparsek.sparsek(zt, k)
    assert torch.equal(p, torch.ones_like(zt))
    tau = sparsek.sparsek_threshold(zt, k)
    assert math.isinf(float(tau)) and float(tau) < 0


@given(z=vectors, k=budgets, mask=st.lists(st.booleans(), min_size=12, max_size=12))
def test_neg_inf_entries_get_zero(z, k, mask):
    """Entries equal to -inf get exactly 0; the finite entries get SPARSEK of the finite sub-vector."""
    mask = mask[: len(z)]
    assume(not all(mask))  # keep at least one finite entry
    zz = np.array(z, dtype=np.float64)
    zz[np.array(mask, dtype=bool)] = -np.inf
    zt = _t(zz)
    p = _np(sparsek.sparsek(zt, k))
    fin = np.isfinite(zz)
    assert np.all(p[~fin] == 0.0)
    np.testing.assert_allclose(p[fin], sparsek_ref(zz[fin], k), atol=1e-9, rtol=0)
    tau = _np(sparsek.sparsek_threshold(zt, k))
    assert_tau_valid(tau, zz[None], k)
    if k < fin.sum():
        assert p.sum() == pytest.approx(k, abs=1e-9 * (1 + len(z)))


@given(z=st.lists(values, min_size=1, max_size=12))
def test_k1_is_sparsemax(z):
    """k = 1 is sparsemax (projection onto the simplex), checked with the sort-based sparsemax formula."""
    p = sparsek.sparsek(_t(z), 1)
    np.testing.assert_allclose(_np(p), sparsemax_ref(z), atol=1e-9, rtol=0)


@pytest.mark.parametrize("k", [0.3, 1.5, 2.25, 3.999, 4.0, 4.001])
def test_non_integer_k(k):
    """Non-integer budgets: sum is k, values agree with the reference."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64)
    p = sparsek.sparsek(z, k)
    np.testing.assert_allclose(_np(p), sparsek_ref(_np(z), k), atol=1e-9, rtol=0)
    np.testing.assert_allclose(_np(p.sum(-1)), np.full(6, k), atol=1e-9)


def test_batched_rows_and_large_n():
    """Many rows at once (including n = 1000) each agree with the reference."""
    g = torch.Generator().manual_seed(5)
    for n, k in [(1, 1), (2, 1), (37, 5), (1000, 64), (1000, 999.5)]:
        z = 3 * torch.randn(4, n, generator=g, dtype=torch.float64)
        p = sparsek.sparsek(z, k)
        np.testing.assert_allclose(_np(p), sparsek_ref(_np(z), k), atol=1e-9, rtol=0)
        assert_tau_valid(_np(sparsek.sparsek_threshold(z, k)), _np(z), k)


def test_equal_scores():
    """All-equal scores: every entry gets k / n."""
    z = torch.full((3, 7), 0.7, dtype=torch.float64)
    p = sparsek.sparsek(z, 3)
    np.testing.assert_allclose(_np(p), np.full((3, 7), 3 / 7), atol=1e-12)
    np.testing.assert_allclose(_np(sparsek.sparsek_threshold(z, 3)), np.full(3, 0.7 - 3 / 7), atol=1e-12)


def test_float32_input():
    """float32 in, float32 out, close to the float64 reference."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, 50, generator=g)
    p = sparsek.sparsek(z, 7)
    tau = sparsek.sparsek_threshold(z, 7)
    assert p.dtype == torch.float32 and tau.dtype == torch.float32
    np.testing.assert_allclose(_np(p), sparsek_ref(_np(z), 7), atol=2e-5, rtol=0)
    np.testing.assert_allclose(_np(tau), tau_bisect(_np(z), 7).tau, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# tensor k, dim
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k_shape", [(), (1,), (4,), (3, 1), (3, 4), (1, 4)], ids=lambda s: "k" + "x".join(map(str, s))
)
def test_tensor_k_broadcasting(k_shape):
    """k given as a tensor broadcastable to z.shape without dim: each row uses its own budget."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    k = 0.5 + 6 * torch.rand(k_shape, generator=g, dtype=torch.float64)  # some >= n = 6
    p = sparsek.sparsek(z, k)
    tau = sparsek.sparsek_threshold(z, k)
    assert p.shape == z.shape and tau.shape == (3, 4)
    kk = torch.broadcast_to(k, (3, 4)).reshape(-1).numpy()
    Z = _np(z).reshape(12, 6)
    np.testing.assert_allclose(_np(p).reshape(12, 6), sparsek_ref(Z, kk), atol=1e-9, rtol=0)
    assert_tau_valid(_np(tau).reshape(-1), Z, kk)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_arbitrary_dim(dim):
    """dim selects the axis the operator normalises along; tau has that axis removed."""
    g = torch.Generator().manual_seed(13)
    z = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    k = 2.5
    p = sparsek.sparsek(z, k, dim=dim)
    tau = sparsek.sparsek_threshold(z, k, dim=dim)
    zm = z.movedim(dim, -1)
    n = zm.shape[-1]
    expected = sparsek_ref(_np(zm).reshape(-1, n), k).reshape(zm.shape)
    np.testing.assert_allclose(_np(p.movedim(dim, -1)), expected, atol=1e-9, rtol=0)
    assert tau.shape == zm.shape[:-1]
    assert_tau_valid(_np(tau).reshape(-1), _np(zm).reshape(-1, n), k)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_tensor_k_keepdim(dim):
    """k with z's rank and size 1 along dim (a keepdim=True reduction) equals k with dim removed, gradients too."""
    g = torch.Generator().manual_seed(23)
    z = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    k_shape = list(z.shape)
    k_shape[dim] = 1
    k_kept = 0.5 + 4 * torch.rand(k_shape, generator=g, dtype=torch.float64)
    grad = torch.randn(z.shape, generator=g, dtype=torch.float64)
    for fn in (sparsek.sparsek, sparsek.sparsek_threshold):
        outs, grads = [], []
        for k in (k_kept, k_kept.squeeze(dim)):
            zz = z.clone().requires_grad_()
            out = fn(zz, k, dim=dim)
            (out * (grad if out.shape == z.shape else grad.sum(dim))).sum().backward()
            outs.append(out)
            grads.append(zz.grad)
        assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_tensor_k_keepdim_2d():
    """The issue's case: z [3, 12] with k [3, 1] is k [3] per row."""
    z = torch.randn(3, 12, generator=torch.Generator().manual_seed(29))
    k = torch.tensor([[1.0], [2.5], [4.0]])
    assert torch.equal(sparsek.sparsek(z, k), sparsek.sparsek(z, k[:, 0]))
    torch.testing.assert_close(sparsek.sparsek(z, k).sum(-1), k[:, 0])


def test_tensor_k_with_dim():
    """Tensor k broadcasts against z.shape with the (non-last) dim removed."""
    g = torch.Generator().manual_seed(17)
    z = torch.randn(3, 8, 2, generator=g, dtype=torch.float64)
    k = torch.tensor([1.0, 3.5], dtype=torch.float64)  # broadcast to (3, 2)
    p = sparsek.sparsek(z, k, dim=1)
    zm = _np(z.movedim(1, -1))  # (3, 2, 8)
    kk = np.broadcast_to(k.numpy(), (3, 2)).reshape(-1)
    np.testing.assert_allclose(_np(p.movedim(1, -1)).reshape(6, 8), sparsek_ref(zm.reshape(6, 8), kk), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# half precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(dtype, atol):
    """fp16/bf16: computed in float32, cast back: result dtype matches and agrees with the reference
    computed on the (exactly representable) half inputs up to half rounding of the output."""
    g = torch.Generator().manual_seed(19)
    z = (2 * torch.randn(6, 40, generator=g)).to(dtype)
    p = sparsek.sparsek(z, 5)
    tau = sparsek.sparsek_threshold(z, 5)
    assert p.dtype == dtype and tau.dtype == dtype
    zz = _np(z)
    np.testing.assert_allclose(_np(p), sparsek_ref(zz, 5), atol=atol, rtol=0)
    ref_tau = tau_bisect(zz, 5).tau
    np.testing.assert_allclose(_np(tau), ref_tau, atol=atol * (1 + np.abs(ref_tau).max()), rtol=0)
    # the float32 path gives the same answer after the cast
    p32 = sparsek.sparsek(z.float(), 5).to(dtype)
    assert (p.float() - p32.float()).abs().max() <= atol


def test_half_precision_backward():
    """Gradients flow for half inputs and have the input dtype."""
    z = (2 * torch.randn(3, 10)).to(torch.bfloat16).requires_grad_()
    p = sparsek.sparsek(z, 3)
    (p * torch.arange(10.0)).sum().backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16
    assert torch.isfinite(z.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def _smooth_point(n: int, k: float, seed: int, rows: int = 1, unique_tau: bool = False) -> torch.Tensor:
    """Random z with every entry at least 1e-3 from a breakpoint of SPARSEK (so FD is valid).

    With ``unique_tau`` the threshold is also required to be unique (some fractional entry): when it
    is not, any tau in an interval is valid, SPEC fixes its gradient to 0, and FD of whichever point
    the implementation picks says nothing.
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(500):
        z = torch.randn(rows, n, generator=g, dtype=torch.float64)
        if breakpoint_margin(z.numpy(), k) > 1e-3 and not (unique_tau and tau_bisect(z.numpy(), k).degenerate.any()):
            return z
    raise AssertionError("could not find a smooth point")


@pytest.mark.parametrize("n,k", [(2, 1), (5, 1), (6, 2), (9, 3.5), (12, 0.4), (12, 11.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_sparsek(n, k, seed):
    """Closed-form backward of p agrees with finite differences (float64, away from breakpoints)."""
    z = _smooth_point(n, k, seed, rows=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparsek.sparsek(x, k), (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", [(2, 1), (5, 1), (6, 2), (9, 3.5), (12, 0.4), (12, 11.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_threshold(n, k, seed):
    """Closed-form backward of tau agrees with finite differences."""
    z = _smooth_point(n, k, seed, rows=2, unique_tau=True).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparsek.sparsek_threshold(x, k), (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck_dim_and_tensor_k(dim):
    """Gradients along a non-last dim with a tensor budget."""
    k = torch.tensor([1.5, 2.0, 3.25], dtype=torch.float64)
    g = torch.Generator().manual_seed(23)
    for _ in range(200):
        z = torch.randn(3, 7, generator=g, dtype=torch.float64)
        if dim == 0:
            z = z.T.contiguous()  # (7, 3): normalise over 7 entries per column
        rows = z.movedim(dim, -1).numpy()
        if all(breakpoint_margin(rows[r], float(k[r])) > 1e-3 for r in range(3)) and not any(
            tau_bisect(rows[r][None], float(k[r])).degenerate[0] for r in range(3)
        ):
            break
    else:
        raise AssertionError("could not find a smooth point")
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparsek.sparsek(x, k, dim=dim), (z,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda x: sparsek.sparsek_threshold(x, k, dim=dim), (z,), eps=1e-6, atol=1e-6
    )


@given(z=st.lists(_cont, min_size=2, max_size=12), k=budgets, seed=st.integers(0, 2**31 - 1))
def test_backward_closed_form(z, k, seed):
    """grad_z = 1_S (g - mean_S g) with S = {0 < p < 1} (zero when S empty); d tau / d z = 1_S / |S|."""
    assume(k < len(z))
    zz = np.array(z)
    p_ref = sparsek_ref(zz, k)
    assume(breakpoint_margin(zz, k) > 1e-7)  # S is unambiguous
    S = (p_ref > 0) & (p_ref < 1)
    g = np.random.default_rng(seed).standard_normal(len(z))

    zt = _t(z).requires_grad_()
    (grad,) = torch.autograd.grad(sparsek.sparsek(zt, k), zt, _t(g))
    expected = np.where(S, g - (g[S].mean() if S.any() else 0.0), 0.0)
    np.testing.assert_allclose(_np(grad), expected, atol=1e-9, rtol=0)

    zt = _t(z).requires_grad_()
    (gt,) = torch.autograd.grad(sparsek.sparsek_threshold(zt, k), zt, _t(1.7))
    expected_t = np.where(S, 1.7 / max(S.sum(), 1), 0.0)
    np.testing.assert_allclose(_np(gt), expected_t, atol=1e-9, rtol=0)


def test_backward_zero_when_gap():
    """A gap of at least 1 around the k-th value: no fractional entry, zero gradient everywhere."""
    z = _t([5.0, 4.5, 2.0, 1.0, -3.0]).requires_grad_()
    p = sparsek.sparsek(z, 2)
    assert torch.equal(p.detach(), _t([1.0, 1.0, 0.0, 0.0, 0.0]))
    (grad,) = torch.autograd.grad(p, z, _t([1.0, -2.0, 3.0, 0.5, 7.0]))
    assert torch.equal(grad, torch.zeros_like(z))
    (gt,) = torch.autograd.grad(sparsek.sparsek_threshold(z, 2), z)
    assert torch.equal(gt, torch.zeros_like(z))


@pytest.mark.parametrize(
    "values,k",
    [
        ([0.06268684703401436, -4.981950938967438], 1),
        ([2.0, -1.0], 1),
        ([10.0, 8.0, 1.0, 0.5, -2.0, 3.0], 2),
        # tau = z_(k) - 1 in exact arithmetic; rounding makes z_(k) - tau = 1 - 4e-16 (still p = 1 up to
        # rounding, which must not turn into an O(1) gradient)
        ([0.0, 0.0, 0.0, -5.0, -3.926294349266757], 4),
    ],
)
def test_backward_zero_when_threshold_not_unique(values, k):
    """Degenerate thresholds (tau anywhere in an interval): p and tau both get zero gradient."""
    z = _t(values).requires_grad_()
    (grad,) = torch.autograd.grad(sparsek.sparsek(z, k), z, torch.arange(1.0, len(values) + 1, dtype=torch.float64))
    assert torch.equal(grad, torch.zeros_like(z))
    (gt,) = torch.autograd.grad(sparsek.sparsek_threshold(z, k), z)
    assert torch.equal(gt, torch.zeros_like(z))


def test_backward_neg_inf_and_all_ones():
    """-inf entries and the k >= n case get zero gradient, and no NaN appears."""
    z = _t([0.3, -math.inf, 0.1, 0.9]).requires_grad_()
    (grad,) = torch.autograd.grad(sparsek.sparsek(z, 1.5), z, _t([1.0, 2.0, 3.0, 4.0]))
    assert torch.isfinite(grad).all() and float(grad[1]) == 0.0
    z = _t([0.3, 0.2]).requires_grad_()
    (grad,) = torch.autograd.grad(sparsek.sparsek(z, 2), z, _t([1.0, 2.0]))
    assert torch.equal(grad, torch.zeros_like(z))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _raises_naming(name: str, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert re.search(rf"\b{name}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
@pytest.mark.parametrize("k", [0, -1, 0.0, -0.5])
def test_error_nonpositive_k(fn, k):
    """k <= 0 is a ValueError that names k."""
    _raises_naming("k", fn, torch.randn(4, dtype=torch.float64), k)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
def test_error_nonpositive_tensor_k(fn):
    """A tensor k with any entry <= 0 is a ValueError that names k."""
    _raises_naming("k", fn, torch.randn(3, 4), torch.tensor([1.0, 0.0, 2.0]))


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
def test_error_nan(fn):
    """NaN in z is a ValueError naming z (never a NaN output)."""
    z = torch.randn(3, 5)
    z[1, 2] = float("nan")
    _raises_naming("z", fn, z, 2)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
@pytest.mark.parametrize("dim", [2, -3, 7])
def test_error_dim_out_of_range(fn, dim):
    """dim out of range is a ValueError naming dim."""
    _raises_naming("dim", fn, torch.randn(3, 5), 2, dim=dim)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
def test_error_empty_dim(fn):
    """An empty normalisation axis is a ValueError naming z or dim."""
    with pytest.raises(ValueError) as info:
        fn(torch.randn(3, 0), 1)
    assert re.search(r"\b(z|dim)\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
@pytest.mark.parametrize("k", ["3", None, True, torch.tensor([True, False, True]), [True, True, False], 2 + 1j, {}],
                         ids=["str", "None", "bool", "bool-tensor", "bool-list", "complex", "dict"])
def test_error_k_type(fn, k):
    """k that is not a real number or tensor is a ValueError naming k and saying what is accepted."""
    with pytest.raises(ValueError, match=r"\bk must be a positive number or a real tensor"):
        fn(torch.randn(3, 12), k)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
@pytest.mark.parametrize("dim", [1.0, True, "1", None])
def test_error_dim_type(fn, dim):
    """dim that is not an int (bool included) is a ValueError naming dim."""
    with pytest.raises(ValueError, match=r"\bdim must be an int"):
        fn(torch.randn(3, 12), 2, dim=dim)


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
def test_k_numpy_and_list(fn):
    """numpy integers, arrays and lists of numbers are budgets like the equal tensor (a list of floats in float64)."""
    z = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(31))
    k = torch.tensor([1.0, 2.1, 3.0], dtype=torch.float64)
    assert torch.equal(fn(z, np.int64(2)), fn(z, 2))
    assert torch.equal(fn(z, k.numpy()), fn(z, k))
    assert torch.equal(fn(z, k.tolist()), fn(z, k))


@pytest.mark.parametrize("fn", [sparsek.sparsek, sparsek.sparsek_threshold])
@pytest.mark.parametrize("k_shape", [(3, 2), (2,), (1, 3), (3, 1, 1)])
def test_error_k_shape(fn, k_shape):
    """k that broadcasts neither to z's shape without dim nor to the keepdim shape is a ValueError naming k."""
    with pytest.raises(ValueError, match=r"\bk of shape .* broadcasts neither"):
        fn(torch.randn(3, 12), torch.ones(k_shape))
