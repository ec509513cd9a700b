"""The fused Triton kernels against the float64 reference: outputs and all four gradients.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on small shapes with small tiles; the
same tests run on a GPU with the real tiles. bf16 at real sizes lives in test_attention_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sparsek.ops.attention import fused  # noqa: E402
from sparsek.ops.attention.interface import gather_is_cheaper, sparsek_attention  # noqa: E402
from sparsek.ops.attention.reference import sparsek_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("fused kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output starts as NaN: an element that no program writes fails the comparison."""
    fused.POISON_OUTPUTS = True
    yield
    fused.POISON_OUTPUTS = False


def make_inputs(batch, t_len, n_q_heads, n_kv_heads, head_dim, dtype, score_scale=2.0):
    def leaf(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dt).requires_grad_()

    return (leaf(batch, t_len, n_q_heads, head_dim), leaf(batch, t_len, n_kv_heads, head_dim),
            leaf(batch, t_len, n_kv_heads, head_dim), leaf(batch, t_len, n_kv_heads, dt=torch.float32,
                                                             scale=score_scale))


def outputs_and_grads(attention, inputs, cotangent, **kwargs):
    out = attention(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, cotangent.to(out.dtype), allow_unused=True)
    return [out, *grads]


def assert_close_to_reference(inputs, cotangent, atol, rtol, **kwargs):
    got = outputs_and_grads(fused.sparsek_attention_fused, inputs, cotangent, **kwargs)
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    want = outputs_and_grads(sparsek_attention_reference, exact_inputs, cotangent.double(), **kwargs)
    names = ["out", "dq", "dk", "dv", "dscores"]
    for name, g, w in zip(names, got, want):
        if kwargs.get("gate") == "none" and name == "dscores":
            assert g is None
            continue
        assert g is not None and not torch.isnan(g).any(), f"{name}: NaN (an element was never written?)"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    # batch, T, Hq, Hk, D, topk, window, gate
    (1, 37, 2, 1, 16, 5, 3, "kv"),        # odd T, GQA 2
    (2, 50, 4, 1, 16, 7, 0, "kv"),        # no window, GQA 4, batch 2
    (1, 45, 2, 2, 32, 4, 6, "v"),
    (1, 40, 2, 1, 16, 3, 2, "none"),
    (1, 33, 8, 1, 16, 6, 1, "kv"),        # GQA 8, window 1
    (1, 33, 1, 1, 16, 100, 2, "kv"),      # topk >= T: full causal attention
    (1, 33, 1, 1, 16, 3, 100, "kv"),      # window >= T
    (1, 33, 1, 1, 16, 0, 5, "kv"),        # window only
    (1, 1, 1, 1, 16, 1, 0, "kv"),         # a single token
    (1, 70, 2, 2, 16, 1, 4, "kv"),        # topk 1, several query blocks
    (1, 64, 2, 1, 16, 20, 9, "v"),        # T a multiple of the tile
    (1, 130, 2, 1, 16, 6, 60, "kv"),      # window wider than a tile: unmasked tiles inside every window
    (1, 97, 1, 1, 16, 4, 41, "none"),
    (1, 100, 4, 2, 16, 5, 50, "v"),       # unmasked tiles with GQA and gate v, forward included
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_matches_reference_fp32(case):
    batch, t_len, hq, hk, d, topk, window, gate = case
    inputs = make_inputs(batch, t_len, hq, hk, d, torch.float32)
    cotangent = torch.randn(batch, t_len, hq, d, device=DEVICE)
    assert_close_to_reference(inputs, cotangent, atol=2e-4, rtol=2e-4, topk=topk, window=window, gate=gate)


def test_list_pass_split_between_programs(monkeypatch):
    """The list pass with its blocks split between programs (atomic adds into scratch) and three slot tiles,
    which skip different numbers of empty first blocks (some programs get no block at all; with window 16 the
    second tile's first key enters exactly at a block's first query)."""
    monkeypatch.setattr(fused, "INTERPRETER_LIST_PROGRAMS", 64)
    inputs = make_inputs(1, 130, 2, 1, 16, torch.float32)
    cotangent = torch.randn(1, 130, 2, 16, device=DEVICE)
    assert_close_to_reference(inputs, cotangent, atol=2e-4, rtol=2e-4, topk=40, window=16, gate="kv")


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_fused_fp16_error_within_twice_pytorch_fp16(case):
    """fp16 kernels: error against float64 at most 2x that of the same math in PyTorch float16 (+ slack)."""
    batch, t_len, hq, hk, d, topk, window, gate = case
    kwargs = dict(topk=topk, window=window, gate=gate)
    inputs = make_inputs(batch, t_len, hq, hk, d, torch.float16)
    cotangent = torch.randn(batch, t_len, hq, d, device=DEVICE)
    got = outputs_and_grads(fused.sparsek_attention_fused, inputs, cotangent, **kwargs)
    exact = outputs_and_grads(sparsek_attention_reference, [x.detach().double().requires_grad_() for x in inputs],
                              cotangent.double(), **kwargs)
    half = outputs_and_grads(lambda *a, **k: sparsek_attention_reference(*a, upcast=False, **k),
                             [x.detach().clone().requires_grad_() for x in inputs], cotangent, **kwargs)
    for name, g, w, h in zip(["out", "dq", "dk", "dv", "dscores"], got, exact, half):
        if g is None:
            assert gate == "none" and name == "dscores"
            continue
        err = (g.double() - w).abs().max().item()
        err_half = (h.double() - w).abs().max().item()
        assert err <= 2 * err_half + 1e-3 * (1 + w.abs().max().item()), f"{name}: {err} vs PyTorch fp16 {err_half}"


@pytest.mark.parametrize("bounds", [[0, 7, 7, 31, 60], [0, 1, 2, 3, 60], [0, 57, 59, 60]],
                         ids=["one-padded-batch", "two-padded-batches", "padded-batch-and-single"])
def test_fused_varlen_matches_reference(bounds):
    """Packed sequences run in padded batches of similar lengths (interface.padding_groups), a group of one
    without padding."""
    t_len, hq, hk, d = 60, 2, 1, 16
    inputs = make_inputs(1, t_len, hq, hk, d, torch.float32)
    cu_seqlens = torch.tensor(bounds, device=DEVICE)
    kwargs = dict(topk=3, window=2, gate="kv", cu_seqlens=cu_seqlens)
    cotangent = torch.randn(1, t_len, hq, d, device=DEVICE)
    got = outputs_and_grads(lambda *a, **k: sparsek_attention(*a, backend="triton", **k), inputs, cotangent,
                            **kwargs)
    want = outputs_and_grads(lambda *a, **k: sparsek_attention(*a, backend="reference", **k),
                             [x.detach().double().requires_grad_() for x in inputs], cotangent.double(), **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=2e-4)


def test_auto_backend_on_cpu_is_not_the_interpreter():
    """Without CUDA, backend="auto" must not pick the interpreter (it is for tests, and slow): it takes the
    PyTorch paths (`gather_is_cheaper` picks which)."""
    if DEVICE != "cpu":
        pytest.skip("CPU dispatch only")
    q, k, v, s = make_inputs(1, 20, 2, 1, 16, torch.float32)
    out = sparsek_attention(q, k, v, s, topk=3, window=2)
    want = sparsek_attention(q, k, v, s, topk=3, window=2, backend="gather" if gather_is_cheaper(20, 3, 2)
                             else "reference")
    assert torch.equal(out, want)


def test_triton_backend_rejects_unsupported_head_dim():
    q, k, v, s = make_inputs(1, 8, 1, 1, 24, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        sparsek_attention(q, k, v, s, topk=2, window=2, backend="triton")


def test_fused_accepts_views_of_a_fused_projection():
    """q, k, v split from one tensor have a last stride of 1 but not contiguous rows; the backward writes
    dk, dv with its own layout, so the inputs must be made contiguous first."""
    qkv = torch.randn(2, 37, 3, 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(2)
    q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
    scores = torch.randn(2, 37, 1, device=DEVICE, requires_grad=True)
    cotangent = torch.randn(2, 37, 1, 16, device=DEVICE)
    out = fused.sparsek_attention_fused(q, k, v, scores, topk=4, window=3)
    grads = torch.autograd.grad(out, (qkv, scores), cotangent)
    exact = [qkv.detach().double().requires_grad_(), scores.detach().double().requires_grad_()]
    q2, k2, v2 = (x.unsqueeze(2) for x in exact[0].unbind(2))
    want = sparsek_attention_reference(q2, k2, v2, exact[1], topk=4, window=3)
    want_grads = torch.autograd.grad(want, exact, cotangent.double())
    torch.testing.assert_close(out.double(), want, atol=2e-4, rtol=2e-4)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=2e-4)


def test_fused_selects_on_float64_scores_exactly():
    """Scores 1e-12 apart are distinct in float64 but tied in float32: the selection must see the difference."""
    u = torch.tensor([1 + 1e-12, 1.0, -5.0, -5.0], dtype=torch.float64, device=DEVICE).view(1, 4, 1)
    q, k, v = (torch.randn(1, 4, 1, 16, device=DEVICE) for _ in range(3))
    got = fused.sparsek_attention_fused(q, k, v, u, topk=1, window=1, gate="none")
    want = sparsek_attention_reference(q, k, v, u, topk=1, window=1, gate="none")
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_give_nan_output(bad):
    """The fused op checks the scores on the device (no host sync): one bad score makes the whole output NaN,
    where unchecked it would silently change the selection. Finite scores leave the output finite."""
    q, k, v, s = (x.detach() for x in make_inputs(1, 21, 2, 1, 16, torch.float32))
    assert torch.isfinite(fused.sparsek_attention_fused(q, k, v, s, topk=3, window=2)).all()
    s[0, 5, 0] = bad
    assert torch.isnan(fused.sparsek_attention_fused(q, k, v, s, topk=3, window=2)).all()


def test_float64_inputs_take_the_reference():
    """The kernels have no float64 path: auto falls back to the reference, backend='triton' says why."""
    q, k, v, s = make_inputs(1, 9, 2, 1, 16, torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        sparsek_attention(q, k, v, s, topk=2, window=2, backend="triton")
    got = sparsek_attention(q, k, v, s, topk=2, window=2, backend="auto")
    torch.testing.assert_close(got, sparsek_attention_reference(q, k, v, s, topk=2, window=2))


def test_varlen_with_many_empty_sequences():
    q, k, v, s = make_inputs(1, 20, 2, 1, 16, torch.float32)
    cu_seqlens = torch.tensor([0] * 50 + [20])
    got = sparsek_attention(q, k, v, s, topk=3, window=2, backend="triton", cu_seqlens=cu_seqlens)
    want = sparsek_attention(q, k, v, s, topk=3, window=2, backend="reference", cu_seqlens=cu_seqlens)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_custom_ops_fake_versions_match_the_real_ones():
    """torch.compile sees the two custom ops through their fake (shape-only) versions: opcheck runs each op
    for real and on fake tensors and compares the outputs' shapes, dtypes and strides."""
    torch.manual_seed(0)
    q, k, v, scores = (x.detach() for x in make_inputs(1, 40, 2, 1, 16, torch.float32))
    utils = ("test_schema", "test_faketensor")
    forward_args = (q, k, v, scores, 4, 4, "kv", 0.25, "auto")
    torch.library.opcheck(fused.attention_forward_op, forward_args, test_utils=utils)
    o, lse, u, tau, start, end, lists = fused.attention_forward_op(*forward_args)
    backward_args = (torch.randn_like(o), q, k, v, o, lse, u, tau, start, end, lists, 4, 4, "kv", 0.25, "auto")
    torch.library.opcheck(fused.attention_backward_op, backward_args, test_utils=utils)
