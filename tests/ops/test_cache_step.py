"""The fused decode step (`ops.decode.cache_step` + the decode kernel) against `SparseKCache`'s PyTorch step,
which is its reference, and against the float64 parallel forward.

The kernels run compiled on a GPU and interpreted on CPU tensors otherwise (conftest sets TRITON_INTERPRET).
An interpreted step costs tens of milliseconds, so the long run takes SPARSEK_DECODE_STEPS steps (80 by
default; the issue's 10,000 were run by hand: SPARSEK_DECODE_STEPS=10000 pytest tests/ops/test_cache_step.py).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from sparsek.cache import SparseKCache
from tests.reference import naive_sparsek_attention

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def run_both(q, k, v, scores, lengths, prompt, **settings):
    """Prefill `prompt` tokens (row b's real ones are its last lengths[b]), then decode the rest with the
    fused step and with the PyTorch step side by side: the two caches must hold the same state after every
    step, and the outputs agree. Returns the fused outputs [B, T - prompt, Hq, D], whether tau was exact for
    every row at each step, and the fused cache."""
    gate = settings.pop("gate", "kv")
    fused = SparseKCache.prefill(k[:, :prompt], v[:, :prompt], scores[:, :prompt], lengths=lengths, **settings)
    torch_step = copy.deepcopy(fused)
    outs, exact = [], []
    for t in range(prompt, q.shape[1]):
        got = fused.step(q[:, t], k[:, t], v[:, t], scores[:, t], gate=gate, backend="triton")
        want = torch_step.step(q[:, t], k[:, t], v[:, t], scores[:, t], gate=gate, backend="reference")
        for name in SparseKCache._STATE:
            assert torch.equal(getattr(fused, name), getattr(torch_step, name)), (t, name)
        if q.dtype == torch.bfloat16:
            # The interpreter computes bf16 dot products wrongly (numpy has no bf16); tests/ops/test_decode.py
            # checks the attention kernel in bf16 on the GPU.
            if DEVICE == "cuda":
                torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        outs.append(got)
        exact.append(bool(fused.exact().all()))
    return torch.stack(outs, 1), exact, fused


def parallel(q, k, v, scores, lengths, **settings):
    """The float64 parallel forward of each row's real tokens, right-aligned like the cache's rows."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lengths):
        start = q.shape[1] - n
        out[b, start:] = naive_sparsek_attention(*(x[b:b + 1, start:].double().cpu() for x in (q, k, v, scores)),
                                                 **settings)[0]
    return out


def inputs(batch, t_len, heads, group, dim, *, ties, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(batch, t_len, heads * group, dim, dtype=dtype)
    k, v = (torch.randn(batch, t_len, heads, dim, dtype=dtype) for _ in range(2))
    scores = torch.randint(0, 3, (batch, t_len, heads)).float() if ties else torch.randn(batch, t_len, heads) * 2
    return [x.to(DEVICE) for x in (q, k, v, scores)]


@pytest.mark.parametrize("topk,window,max_kept,ties,gate", [
    (4, 3, "auto", True, "kv"),      # ties everywhere: slot eviction and the kept buffer's first-lowest column
    (4, 2, 16, True, "v"),           # a full kept buffer (two interpreter chunks) with tied lowest scores
    (3, 0, 5, False, "v"),           # no window, and a kept buffer so small that it drops scores
    (0, 4, "auto", False, "kv"),     # window only
    (1, 1, 2, False, "none"),        # the smallest budget, max_kept = topk + 1
    (50, 2, "auto", False, "kv"),    # topk beyond the context: the slots never fill
    (2, 70, "auto", True, "kv"),     # window beyond the context: nothing becomes a candidate
])
def test_fused_step_equals_the_pytorch_step(topk, window, max_kept, ties, gate):
    """Left-padded rows (row 1 has 5 tokens fewer), GQA 2; outputs equal the parallel forward where exact."""
    t_len, prompt = 40, 9
    q, k, v, scores = inputs(2, t_len, 1, 2, 16, ties=ties, seed=topk + window)
    lengths = [t_len, t_len - 5]
    got, exact, _ = run_both(q, k, v, scores, [prompt, prompt - 5], prompt, topk=topk, window=window,
                          max_kept=max_kept, gate=gate)
    want = parallel(q, k, v, scores, lengths, topk=topk, window=window, gate=gate)[:, prompt:]
    steps = [t for t, e in enumerate(exact) if e]
    assert steps                                                      # each case has exact steps to compare
    torch.testing.assert_close(got[:, steps].double().cpu(), want[:, steps], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hint", ["carried", "garbage"])
def test_tau_hint_never_changes_the_answer(hint):
    """The fused step probes the last step's tau first (cache.tau_hint). It carries the kept scores' tau, and
    any value in it, however wrong, still gives the PyTorch step's outputs: the bracket decides, not the hint."""
    q, k, v, scores = inputs(2, 60, 2, 1, 16, ties=False, seed=5)
    fused = SparseKCache.prefill(k[:, :20], v[:, :20], scores[:, :20], topk=5, window=3)
    torch_step = copy.deepcopy(fused)
    garbage = torch.tensor([[1e9, -1e9], [float("nan"), 0.25]], dtype=torch.float64, device=DEVICE)
    for t in range(20, 60):
        if hint == "garbage":
            fused.tau_hint.copy_(garbage.roll(t, dims=1))
        got = fused.step(q[:, t], k[:, t], v[:, t], scores[:, t], backend="triton")
        want = torch_step.step(q[:, t], k[:, t], v[:, t], scores[:, t], backend="reference")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if hint == "carried":
            torch.testing.assert_close(fused.tau_hint, torch_step.threshold(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("splits", [1, 3])
def test_kernels_flag_non_finite_scores(splits):
    """The kernels' own handling of a NaN or inf score (the host check refuses them for CPU tensors; the GPU
    test below runs the whole step): the token enters as -inf, exactly as the PyTorch step stores it, the
    score is flagged, and only its row's attention output is NaN, whether the entries are split or not."""
    from sparsek.ops.decode import fused as fused_ops
    q, k, v, scores = inputs(2, 24, 2, 2, 16, ties=False, seed=9)
    cache = SparseKCache.prefill(k[:, :20], v[:, :20], scores[:, :20], topk=3, window=2)
    torch_step = copy.deepcopy(cache)
    for t, bad in ((20, (1, 0, float("nan"))), (21, (0, 1, float("inf"))), (22, (0, 0, -float("inf"))), (23, None)):
        s = scores[:, t].clone()
        if bad:
            s[bad[0], bad[1]] = bad[2]
        weight, attended, nonfinite = fused_ops.cache_step(cache, k[:, t], v[:, t], s)
        torch_step._append(k[:, t], v[:, t], torch.where(s.isfinite(), s, -torch.inf))
        for name in SparseKCache._STATE:
            assert torch.equal(getattr(cache, name), getattr(torch_step, name)), (t, name)
        assert torch.equal(nonfinite, (~s.isfinite()).to(torch.uint8))
        got = fused_ops.decode_attention_triton(q[:, t], cache.keys, cache.values, weight, attended, splits=splits,
                                                nonfinite=nonfinite)
        plain = fused_ops.decode_attention_triton(q[:, t], cache.keys, cache.values, weight, attended, splits=splits)
        for row in range(2):
            if bad and row == bad[0]:
                assert torch.isnan(got[row]).all()
            else:
                assert torch.equal(got[row], plain[row]) and torch.isfinite(got[row]).all()


def test_fused_step_with_float64_scores():
    """float64 scores (the cache keeps them in float64, as the parallel path selects): the same state."""
    q, k, v, scores = inputs(2, 30, 1, 2, 16, ties=True, seed=6)
    scores = (scores.double() + 1e-12 * torch.arange(30, device=scores.device)[:, None]).contiguous()
    run_both(q, k, v, scores, [6, 2], 6, topk=3, window=2, max_kept=5)


def test_fused_step_in_bfloat16():
    """bf16 keys and values: the same cache state as the PyTorch step (the kernel moves the same bits), and on
    a GPU the same outputs."""
    q, k, v, scores = inputs(2, 30, 2, 2, 16, ties=True, dtype=torch.bfloat16, seed=5)
    run_both(q, k, v, scores, None, 6, topk=3, window=2)


def test_long_decode():
    """SPARSEK_DECODE_STEPS steps from an empty cache: ties, a bounded kept buffer that drops live scores, a
    left-padded row; the state equals the PyTorch step's at every step, the outputs the float64 parallel
    forward's wherever tau is exact (and always with gate "none", whose selection never depends on tau)."""
    steps = int(os.environ.get("SPARSEK_DECODE_STEPS", "80"))
    q, k, v, scores = inputs(2, steps + 4, 1, 2, 16, ties=True, seed=7)
    scores = scores + 0.01 * torch.arange(steps + 4, device=scores.device)[:, None]    # a recency drift
    lengths = [steps + 4, steps + 1]                                  # row 1: 3 tokens of left padding
    for gate in ("none", "kv"):
        got, exact, cache = run_both(q, k, v, scores, [4, 1], 4, topk=3, window=2, max_kept=16, gate=gate)
        want = parallel(q, k, v, scores, lengths, topk=3, window=2, gate=gate)[:, 4:]
        kept = range(len(exact)) if gate == "none" else [t for t, e in enumerate(exact) if e]
        assert len(kept) > len(exact) // 2
        torch.testing.assert_close(got[:, kept].double().cpu(), want[:, kept], atol=1e-5, rtol=1e-5)
        assert (cache.dropped_u > -torch.inf).all()                   # the bounded buffer dropped scores


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (TRITON_INTERPRET unset)")
def test_fused_step_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of the fused step: one graph, and the same outputs and state as eager."""
    q, k, v, scores = inputs(2, 60, 2, 2, 64, ties=True, dtype=torch.bfloat16, seed=9)
    eager = SparseKCache.prefill(k[:, :20], v[:, :20], scores[:, :20], topk=8, window=4, lengths=[20, 13])
    compiled = copy.deepcopy(eager)
    explained = torch._dynamo.explain(copy.deepcopy(eager).step)(q[:, 20], k[:, 20], v[:, 20], scores[:, 20])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    step = torch.compile(compiled.step, fullgraph=True)
    for t in range(20, 60):
        want = eager.step(q[:, t], k[:, t], v[:, t], scores[:, t])
        torch.testing.assert_close(step(q[:, t], k[:, t], v[:, t], scores[:, t]), want, atol=1e-2, rtol=1e-2)
    for name in SparseKCache._STATE:
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (TRITON_INTERPRET unset)")
def test_non_finite_scores_on_the_gpu():
    """A NaN or inf score (not checked on the host on CUDA): that row's output is NaN for that step only, and
    the fused and PyTorch steps keep the same state (the token enters with score -inf)."""
    q, k, v, scores = inputs(2, 40, 1, 2, 64, ties=True, seed=8)
    scores[1, 12, 0], scores[0, 20, 0] = float("nan"), float("inf")
    fused = SparseKCache.prefill(k[:, :4], v[:, :4], scores[:, :4], topk=3, window=2)
    torch_step = copy.deepcopy(fused)
    for t in range(4, 40):
        got = fused.step(q[:, t], k[:, t], v[:, t], scores[:, t], backend="triton")
        want = torch_step.step(q[:, t], k[:, t], v[:, t], scores[:, t], backend="reference")
        for name in SparseKCache._STATE:
            assert torch.equal(getattr(fused, name), getattr(torch_step, name)), (t, name)
        bad = {12: 1, 20: 0}.get(t)
        for row in range(2):
            assert torch.isnan(got[row]).all() == (row == bad) and torch.isfinite(got[row]).all() == (row != bad)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
