"""sparsek_attention (SPEC section 3) against a naive per-query float64 loop written in tests/reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsek
from tests.reference import naive_sparsek_attention, selection_margin

GATES = ["kv", "v", "none"]

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_inputs(B, T, Hq, Hkv, D, *, seed=0, dtype=torch.float64, score_dtype=torch.float64, score_scale=1.0,
                ties=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    if ties:
        u = torch.randint(-2, 3, (B, T, Hkv), generator=g).double() / 2
    else:
        u = score_scale * torch.randn(B, T, Hkv, generator=g, dtype=torch.float64)
    return q, k, v, u.to(score_dtype)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def grads_of(fn, q, k, v, u, cot):
    """Output of fn and grads w.r.t. (q, k, v, u) for cotangent cot (None grads become zeros)."""
    q, k, v, u = leaves(q, k, v, u)
    out = fn(q, k, v, u)
    gs = torch.autograd.grad(out, (q, k, v, u), cot, allow_unused=True)
    gs = [torch.zeros_like(x) if g is None else g for g, x in zip(gs, (q, k, v, u))]
    return out.detach(), gs


def compare_with_naive(q, k, v, u, *, topk, window, gate, scale=None, cu_seqlens=None, atol=1e-9, seed=0):
    """Forward and backward (random cotangent) of sparsek_attention versus the naive loop, in float64."""
    g = torch.Generator().manual_seed(seed + 1000)
    cot = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.dtype)

    def lib(q, k, v, u):
        return sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window, gate=gate, scale=scale,
                                         cu_seqlens=cu_seqlens)

    def ref(q, k, v, u):
        return naive_sparsek_attention(q.double(), k.double(), v.double(), u.double(), topk=topk, window=window,
                                       gate=gate, scale=scale, cu_seqlens=cu_seqlens)

    out, g_lib = grads_of(lib, q, k, v, u, cot)
    exp, g_ref = grads_of(ref, q, k, v, u, cot)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), exp.double(), atol=atol, rtol=0, msg="output")
    for name, a, b in zip("qkvu", g_lib, g_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0, msg=f"grad {name}")
    if gate == "none":
        assert torch.all(g_lib[3] == 0), "gate 'none' must not send gradient to the scores"
    return out


def sdpa_causal(q, k, v, scale=None):
    """Plain causal attention with SDPA ([B, T, H, D] layout, GQA by repeating KV heads)."""
    G = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(G, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(G, dim=2).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# forward + backward versus the naive loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (4, 1), (8, 1)], ids=["gqa1", "gqa2", "gqa4", "gqa8"])
def test_matches_naive_gqa(gate, Hq, Hkv):
    """Every gate and GQA ratio 1/2/4/8, odd T, topk and window in the interesting range."""
    q, k, v, u = make_inputs(2, 13, Hq, Hkv, 4, seed=Hq * 10 + Hkv)
    compare_with_naive(q, k, v, u, topk=3, window=2, gate=gate)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("topk", [1, 2, 17, 40])
@pytest.mark.parametrize("window", [0, 1, 4, 30])
def test_matches_naive_budgets(gate, topk, window):
    """topk 1 / 2 / >= T and windows 0 / 1 / > T on an odd length (T = 17)."""
    q, k, v, u = make_inputs(1, 17, 2, 1, 4, seed=topk * 100 + window)
    compare_with_naive(q, k, v, u, topk=topk, window=window, gate=gate)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", [1, 3])
def test_matches_naive_topk_zero(gate, window):
    """topk = 0 with a window: plain sliding-window attention."""
    q, k, v, u = make_inputs(1, 11, 2, 2, 4, seed=window)
    compare_with_naive(q, k, v, u, topk=0, window=window, gate=gate)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("score_scale", [0.2, 3.0])
def test_matches_naive_score_scales(gate, score_scale):
    """Small scores (many fractional entries, tau path matters) and large ones (mostly 0/1 masks)."""
    q, k, v, u = make_inputs(2, 21, 4, 2, 8, seed=int(score_scale * 10), score_scale=score_scale)
    compare_with_naive(q, k, v, u, topk=4, window=3, gate=gate)


@pytest.mark.parametrize("gate", GATES)
def test_matches_naive_tied_scores(gate):
    """Heavily tied scores: ties go to the newer key. (Half-integer ties sit on breakpoints, where the
    gradient is one-sided; only the forward is compared.)"""
    q, k, v, u = make_inputs(2, 19, 2, 1, 4, seed=7, ties=True)
    out = sparsek.sparsek_attention(q, k, v, u, topk=3, window=2, gate=gate)
    exp = naive_sparsek_attention(q, k, v, u, topk=3, window=2, gate=gate)
    torch.testing.assert_close(out, exp, atol=1e-9, rtol=0)


def test_matches_naive_equal_scores():
    """All scores equal: the newest candidates are selected, each with mask k / |C_i|."""
    q, k, v, _ = make_inputs(1, 15, 2, 1, 4, seed=8)
    u = torch.full((1, 15, 1), 0.3, dtype=torch.float64)
    for gate in GATES:
        out = sparsek.sparsek_attention(q, k, v, u, topk=4, window=1, gate=gate)
        exp = naive_sparsek_attention(q, k, v, u, topk=4, window=1, gate=gate)
        torch.testing.assert_close(out, exp, atol=1e-9, rtol=0)


@settings(max_examples=25)
@given(
    T=st.integers(1, 12),
    B=st.integers(1, 2),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),
    topk=st.integers(0, 13),
    window=st.integers(0, 13),
    gate=st.sampled_from(GATES),
    score_scale=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 10_000),
)
def test_random_configurations(T, B, heads, topk, window, gate, score_scale, seed):
    """Hypothesis over shapes, budgets, windows, gates and score scales: forward and all gradients."""
    if topk == 0 and window == 0:
        window = 1
    Hq, Hkv = heads
    q, k, v, u = make_inputs(B, T, Hq, Hkv, 4, seed=seed, score_scale=score_scale)
    compare_with_naive(q, k, v, u, topk=topk, window=window, gate=gate, seed=seed)


@pytest.mark.parametrize("gate", ["kv", "v"])
@pytest.mark.parametrize(
    "values",
    [
        [10.0, 8.0, 1.0, 0.5, -2.0, 3.0],
        [2.0, -1.0],
        [0.06268684703401436, -4.981950938967438],
        # tau_1 = u_1 - 1 in exact arithmetic; in float64 u_1 - tau_1 rounds to 1 - 2e-16
        [-2.4756902281425965, -0.9489243784731186],
    ],
)
def test_gradient_when_threshold_not_unique(gate, values):
    """topk = 1, window = 0, and a gap >= 1 below the best score: every mask is exactly 1 and stays 1
    under small perturbations of the scores (no fractional entry, SPEC 1), so d out / d scores = 0."""
    T = len(values)
    u = torch.tensor(values, dtype=torch.float64).view(1, T, 1)
    q = torch.ones(1, T, 1, 1, dtype=torch.float64)
    v = torch.arange(1.0, T + 1, dtype=torch.float64).view(1, T, 1, 1)
    ul = u.clone().requires_grad_()
    out = sparsek.sparsek_attention(q, q, v, ul, topk=1, window=0, gate=gate)
    (gu,) = torch.autograd.grad(out.sum(), ul)
    torch.testing.assert_close(gu, torch.zeros_like(u), atol=1e-12, rtol=0)
    # the naive reference agrees (and so do finite differences, by construction of the example)
    exp = naive_sparsek_attention(q, q, v, u, topk=1, window=0, gate=gate)
    torch.testing.assert_close(out.detach(), exp, atol=1e-12, rtol=0)


@pytest.mark.parametrize("gate", GATES)
def test_custom_scale(gate):
    """An explicit scale replaces D ** -0.5."""
    q, k, v, u = make_inputs(1, 12, 2, 2, 4, seed=3)
    compare_with_naive(q, k, v, u, topk=3, window=2, gate=gate, scale=0.37)


def test_float32_inputs():
    """float32 q/k/v with float32 scores: output float32, close to the float64 reference."""
    q, k, v, u = make_inputs(2, 25, 4, 2, 8, seed=4, dtype=torch.float32, score_dtype=torch.float32)
    for gate in GATES:
        out = sparsek.sparsek_attention(q, k, v, u, topk=5, window=3, gate=gate)
        assert out.dtype == torch.float32
        exp = naive_sparsek_attention(q.double(), k.double(), v.double(), u.double(), topk=5, window=3, gate=gate)
        torch.testing.assert_close(out.double(), exp, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half-precision q/k/v with float32 scores: output in the dtype of q, close to the reference."""
    q, k, v, u = make_inputs(1, 20, 2, 1, 8, seed=5, dtype=dtype, score_dtype=torch.float32)
    out = sparsek.sparsek_attention(q, k, v, u, topk=4, window=2)
    assert out.dtype == dtype
    exp = naive_sparsek_attention(q.double(), k.double(), v.double(), u.double(), topk=4, window=2, gate="kv")
    torch.testing.assert_close(out.double(), exp, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# dense limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("topk,window", [(9, 0), (50, 2), (1, 9), (0, 40), (3, 100)])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1)])
def test_dense_limit_equals_causal_sdpa(gate, topk, window, Hq, Hkv):
    """topk >= T or window >= T: every causal key has mask 1, so the result is causal softmax attention."""
    q, k, v, u = make_inputs(2, 9, Hq, Hkv, 4, seed=topk + window)
    out = sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window, gate=gate)
    torch.testing.assert_close(out, sdpa_causal(q, k, v), atol=1e-10, rtol=0)
    # and the scores get no gradient (all masks are constant 1)
    ul = u.clone().requires_grad_()
    out = sparsek.sparsek_attention(q, k, v, ul, topk=topk, window=window, gate=gate)
    if out.requires_grad:  # gate "none" may cut the scores out of the graph entirely
        (gu,) = torch.autograd.grad(out, ul, torch.randn_like(out), allow_unused=True)
        assert gu is None or torch.all(gu == 0)


def test_dense_limit_float32_scale():
    """Dense limit in float32 with a custom scale."""
    q, k, v, u = make_inputs(1, 33, 4, 2, 16, seed=1, dtype=torch.float32, score_dtype=torch.float32)
    out = sparsek.sparsek_attention(q, k, v, u, topk=64, window=0, scale=0.2)
    torch.testing.assert_close(out, sdpa_causal(q, k, v, scale=0.2), atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("cu", [[0, 5, 12, 20], [0, 1, 9, 10, 20], [0, 20]], ids=["3seq", "4seq", "1seq"])
def test_varlen(gate, cu):
    """cu_seqlens: each sequence independent with positions restarting at 0; equals running each sequence
    separately, and the naive loop (forward and gradients)."""
    q, k, v, u = make_inputs(1, 20, 4, 2, 4, seed=len(cu))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    out = compare_with_naive(q, k, v, u, topk=2, window=2, gate=gate, cu_seqlens=cu_t)
    for s0, s1 in zip(cu[:-1], cu[1:]):
        sl = slice(s0, s1)
        sep = sparsek.sparsek_attention(q[:, sl], k[:, sl], v[:, sl], u[:, sl], topk=2, window=2, gate=gate)
        torch.testing.assert_close(out[:, sl], sep, atol=1e-10, rtol=0)


@pytest.mark.parametrize("lengths", [[7, 0, 24, 29], [1, 1, 1, 57], [57, 2, 1], [5], [100, 8000, 100, 100, 4000, 3]])
def test_padding_groups_cover_every_sequence_within_twice_the_tokens(lengths):
    from sparsek.ops.attention.interface import padding_groups

    bounds = np.cumsum([0, *lengths]).tolist()
    sequences = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    groups = padding_groups(sequences)
    assert sorted(s for g in groups for s in g) == sorted(sequences)
    for group in groups:
        sizes = [b - a for a, b in group]
        assert sizes == sorted(sizes, reverse=True)
        assert len(group) * sizes[0] <= 2 * sum(sizes)
    # The groups' first sequences get shorter; a sequence that fits the group before it would have joined it.
    for before, after in zip(groups[:-1], groups[1:]):
        longest = before[0][1] - before[0][0]
        tokens = sum(b - a for a, b in before)
        assert (len(before) + 1) * longest > 2 * (tokens + after[0][1] - after[0][0])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_varlen_with_empty_sequence(dtype):
    """Non-decreasing cu_seqlens may contain an empty sequence."""
    q, k, v, u = make_inputs(1, 12, 2, 1, 4, seed=2)
    cu = torch.tensor([0, 4, 4, 12], dtype=dtype)
    out = sparsek.sparsek_attention(q, k, v, u, topk=2, window=1, cu_seqlens=cu)
    exp = naive_sparsek_attention(q, k, v, u, topk=2, window=1, cu_seqlens=cu)
    torch.testing.assert_close(out, exp, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------


def _smooth_inputs(T, Hq, Hkv, D, topk, window, seed):
    """Random float64 inputs whose scores are far (> 1e-3) from any selection or mask breakpoint."""
    for s in range(seed, seed + 500):
        q, k, v, u = make_inputs(1, T, Hq, Hkv, D, seed=s, score_scale=0.7)
        if all(selection_margin(u[0, :, h].numpy(), topk, window) > 1e-3 for h in range(Hkv)):
            return q, k, v, u
    raise AssertionError("no smooth point found")


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,topk,window", [(8, 2, 1), (10, 3, 0), (7, 1, 2)])
def test_gradcheck(gate, T, topk, window):
    """Analytic gradients w.r.t. q, k, v and scores agree with finite differences (float64)."""
    q, k, v, u = _smooth_inputs(T, 2, 1, 4, topk, window, seed=T)
    inputs = tuple(leaves(q, k, v, u))
    if gate == "none":
        inputs[3].requires_grad_(False)

    def fn(q, k, v, u):
        return sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window, gate=gate)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_varlen():
    """Finite differences through the varlen path."""
    q, k, v, u = _smooth_inputs(9, 2, 2, 4, 2, 1, seed=50)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    # sequences are independent: margins of each sequence's own prefixes
    for s0, s1 in [(0, 4), (4, 9)]:
        assert all(selection_margin(u[0, s0:s1, h].numpy(), 2, 1) > 1e-4 for h in range(2))
    assert torch.autograd.gradcheck(
        lambda q, k, v, u: sparsek.sparsek_attention(q, k, v, u, topk=2, window=1, cu_seqlens=cu),
        tuple(leaves(q, k, v, u)), eps=1e-6, atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# longer sequence
# ---------------------------------------------------------------------------------------------


def test_long_sequence_subsampled():
    """T = 2048 in float32 runs and agrees with the naive loop on ~20 sampled query positions."""
    T = 2048
    q, k, v, u = make_inputs(1, T, 4, 2, 16, seed=42, dtype=torch.float32, score_dtype=torch.float32)
    u = u + (0.002 * torch.arange(T, dtype=torch.float32))[None, :, None]  # recency bias as in SPEC 2
    topk, window = 64, 32
    out = sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window)
    assert out.shape == q.shape and torch.isfinite(out).all()
    rng = np.random.default_rng(0)
    queries = sorted({0, 1, window, window + topk, T - 1, *rng.choice(T, 15, replace=False).tolist()})
    exp = naive_sparsek_attention(q.double(), k.double(), v.double(), u.double(), topk=topk, window=window,
                                  queries=queries)
    torch.testing.assert_close(out[:, queries].double(), exp, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _call(**over):
    q, k, v, u = make_inputs(1, 8, 4, 2, 4, seed=0)
    args = dict(q=q, k=k, v=v, scores=u, topk=2, window=1)
    args.update(over)
    return sparsek.sparsek_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("scores"), **args)


def _bad_inputs():
    q, k, v, u = make_inputs(1, 8, 4, 2, 4, seed=0)
    return {
        "k_shape": dict(k=k[:, :7]),
        "v_len": dict(v=v[:, :7]),
        "kv_heads_mismatch": dict(v=torch.randn(1, 8, 1, 4, dtype=torch.float64)),
        "scores_heads": dict(scores=u[..., :1]),
        "scores_len": dict(scores=u[:, :5]),
        "q_rank": dict(q=q[0]),
        "head_dim": dict(q=q[..., :2]),
        "batch": dict(k=k.expand(2, -1, -1, -1), v=v.expand(2, -1, -1, -1)),
        "kv_dtype": dict(k=k.float()),
        "scores_dtype_int": dict(scores=u.long()),
        "gqa_indivisible": dict(q=torch.randn(1, 8, 3, 4, dtype=torch.float64)),
        "topk_negative": dict(topk=-1),
        "window_negative": dict(window=-2),
        "topk_window_zero": dict(topk=0, window=0),
        "gate_unknown": dict(gate="k"),
        "gate_case": dict(gate="KV"),
        "cu_not_zero_start": dict(cu_seqlens=torch.tensor([1, 4, 8], dtype=torch.int32)),
        "cu_unsorted": dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)),
        "cu_wrong_total": dict(cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32)),
        "cu_batch_2": dict(q=q.expand(2, -1, -1, -1), k=k.expand(2, -1, -1, -1), v=v.expand(2, -1, -1, -1),
                           scores=u.expand(2, -1, -1), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)),
        "cu_2d": dict(cu_seqlens=torch.tensor([[0, 4, 8]], dtype=torch.int32)),
        "cu_float": dict(cu_seqlens=torch.tensor([0.0, 4.0, 8.0])),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_errors(case):
    """Invalid arguments raise ValueError."""
    with pytest.raises(ValueError):
        _call(**_bad_inputs()[case])


@pytest.mark.parametrize(
    "over,name",
    [
        (dict(topk=-1), "topk"),
        (dict(window=-1), "window"),
        (dict(gate="qk"), "gate"),
        (dict(cu_seqlens=torch.tensor([0, 9, 8], dtype=torch.int32)), "cu_seqlens"),
    ],
)
def test_error_messages_name_argument(over, name):
    """The ValueError message names the offending argument."""
    with pytest.raises(ValueError, match=name):
        _call(**over)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise_on_cpu(bad):
    """On CPU the scores are checked on the host (free there); a bad score raises instead of selecting."""
    _, _, _, u = make_inputs(1, 8, 4, 2, 4, seed=0)
    u = u.clone()
    u[0, 3, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        _call(scores=u)


def test_valid_call_baseline():
    """The baseline used by the error tests is itself valid (so the errors come from the one change)."""
    assert _call().shape == (1, 8, 4, 4)
    assert _call(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)).shape == (1, 8, 4, 4)


# ---------------------------------------------------------------------------------------------
# large score offsets (SPARSEK is shift invariant per row)
# ---------------------------------------------------------------------------------------------


def _triton_backend():
    """pytest param for backend "triton": CUDA tensors, or CPU tensors under the interpreter; skipped
    without the triton package."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return pytest.param("triton", marks=pytest.mark.skip(reason="needs the triton package"))
    return "triton"


OFFSET_BACKENDS = ["reference", "gather", _triton_backend()]


def _offset_inputs(backend, offset, noise, *, seed=7, T=37):
    """float32 q, k, v [2, T, 4, 16] and scores offset + noise * randn [2, T, 2] in float32, on the device the
    backend runs on (the fused kernels need a power-of-two head dim of at least 16)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v, _ = make_inputs(2, T, 4, 2, 16, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    u = (offset + noise * torch.randn(2, T, 2, generator=g, dtype=torch.float64)).float()
    return [x.to(device) for x in (q, k, v, u)]


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
@pytest.mark.parametrize("offset,noise", [(1e8, 1.0), (2e7, 4.0), (3e4, 1.0), (-3e7, 2.0)])
@pytest.mark.parametrize("gate", GATES)
def test_large_score_offset_is_exact(backend, offset, noise, gate):
    """float32 scores far from 0 (1e8 + randn: float32 holds them only to units of 8) give the output and the
    gradients of the float64 naive loop over the same scores minus the offset (taken in float64, where it is
    exact), on every backend; and the output and scores' gradient of the call with the offset removed."""
    q, k, v, u = _offset_inputs(backend, offset, noise)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device)

    def lib(q, k, v, u):
        return sparsek.sparsek_attention(q, k, v, u, topk=5, window=3, gate=gate, backend=backend)

    def ref(q, k, v, u):
        return naive_sparsek_attention(q, k, v, u, topk=5, window=3, gate=gate)

    out, grads = grads_of(lib, q, k, v, u, cot)
    cpu64 = [x.cpu().double() for x in (q, k, v)]
    exp, grads_exp = grads_of(ref, *cpu64, u.cpu().double() - offset, cot.cpu().double())
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-5, rtol=0, msg="output")
    for name, got, want in zip("qkvu", grads, grads_exp):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-4, msg=f"grad {name}")

    shifted = (u.double() - offset).float()                  # exact: the offset is a multiple of float32's unit
    assert torch.equal(shifted.double() + offset, u.double())
    out_shifted, grads_shifted = grads_of(lib, q, k, v, shifted, cot)
    # The library shifts by the row's median, the test by the offset: equal up to float32 rounding.
    torch.testing.assert_close(out, out_shifted, atol=1e-6, rtol=0, msg="output without the offset")
    torch.testing.assert_close(grads[3], grads_shifted[3], atol=1e-5, rtol=0, msg="grad u without the offset")


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
def test_large_score_offset_varlen(backend):
    """Packed sequences share one offset per row: still exact (forward and the scores' gradient)."""
    q, k, v, u = _offset_inputs(backend, 2e7, 4.0, seed=11, T=40)
    q, k, v, u = (x[:1] for x in (q, k, v, u))
    cu = torch.tensor([0, 9, 9, 30, 40], dtype=torch.int32, device=q.device)
    cot = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(q.device)

    def lib(q, k, v, u):
        return sparsek.sparsek_attention(q, k, v, u, topk=4, window=2, cu_seqlens=cu, backend=backend)

    def ref(q, k, v, u):
        return naive_sparsek_attention(q, k, v, u, topk=4, window=2, cu_seqlens=cu.cpu())

    out, grads = grads_of(lib, q, k, v, u, cot)
    cpu64 = [x.cpu().double() for x in (q, k, v)]
    exp, grads_exp = grads_of(ref, *cpu64, u.cpu().double() - 2e7, cot.cpu().double())
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-5, rtol=0, msg="output")
    torch.testing.assert_close(grads[3].cpu().double(), grads_exp[3], atol=1e-4, rtol=1e-4, msg="grad u")


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_score_spread_beyond_float32_raises_or_is_exact(backend, score_dtype):
    """A row whose thresholds lie 1e6 above most of its scores (the first 10 keys at 1e6 + randn, the rest
    near 0): no single offset brings both near 0, and float32 holds tau there only to 1/16. float32 scores
    raise a ValueError on every backend; float64 scores are exact or raise (the fused kernels are float32).
    On CUDA the fused kernels cannot raise without waiting for the GPU: they return all NaN instead."""
    q, k, v, _ = _offset_inputs(backend, 0.0, 1.0)
    g = torch.Generator().manual_seed(13)
    u = torch.randn(2, 37, 2, generator=g, dtype=torch.float64)
    u[:, :10] += 1e6
    u = u.to(score_dtype).to(q.device)
    try:
        out = sparsek.sparsek_attention(q, k, v, u, topk=5, window=3, backend=backend)
    except ValueError as error:
        assert "scores too large" in str(error)
        return
    if out.is_cuda and backend == "triton":
        assert torch.isnan(out).all()
        return
    assert score_dtype == torch.float64, "float32 thresholds that float32 cannot hold must raise"
    exp = naive_sparsek_attention(*(x.cpu().double() for x in (q, k, v, u)), topk=5, window=3)
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
@pytest.mark.parametrize("case", ["overflow", "outliers"])
def test_far_scores_stay_exact(backend, case):
    """Scores at the float32 limit: 3e38 ties hold the threshold (3e38 - 2/3 exists in no float format), and
    -3e38 minus that median overflows float32, which must not turn into inf or NaN; lone outliers (+-1e30,
    -3e38) among scores near 0 leave the threshold where it is and must not trip the fused path's check."""
    q, k, v, _ = _offset_inputs(backend, 0.0, 1.0, T=9)
    if case == "overflow":
        u = torch.tensor([3e38, 3e38, -3e38, 3e38, 0.5, 3e38, -3e38, 3e38, 0.1])
    else:
        u = torch.randn(9, generator=torch.Generator().manual_seed(14))
        u[[1, 4, 6]] = torch.tensor([1e30, -3e38, -1e30])
    u = u.view(1, 9, 1).expand(2, 9, 2).to(q.device)
    out = sparsek.sparsek_attention(q, k, v, u, topk=2, window=1, backend=backend)
    u64 = u.cpu().double()
    exp = naive_sparsek_attention(*(x.cpu().double() for x in (q, k, v)), u64 - u64.median(), topk=2, window=1)
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
def test_empty_sequence_with_offset(backend):
    """T = 0: no row to centre (a median of nothing does not exist): an empty output, as before."""
    q, k, v, u = _offset_inputs(backend, 1e8, 1.0, T=0)
    assert sparsek.sparsek_attention(q, k, v, u, topk=2, window=1, backend=backend).shape == q.shape
