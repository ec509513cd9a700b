"""SparseKCache safety: a failed step leaves the cache as it was, non-finite scores are refused, and the kept
scores stay bounded (max_kept) with the results exact wherever the cache says they are."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsek import sparsek_attention
from sparsek.cache import SparseKCache


def assert_same_state(cache: SparseKCache, other: SparseKCache) -> None:
    for name in SparseKCache._STATE:
        assert torch.equal(getattr(cache, name), getattr(other, name)), name


def small_cache(head_dim: int = 4):
    """A cache past its budget (the next step moves a token out of the window and evicts a slot) and the
    inputs of that step and of two more."""
    torch.manual_seed(0)
    k, v = (torch.randn(2, 12, 1, head_dim, dtype=torch.float64) for _ in range(2))
    scores = torch.arange(12.0).expand(2, 12)[..., None] / 4      # newer keys win: every candidate evicts one
    cache = SparseKCache.prefill(k[:, :9], v[:, :9], scores[:, :9], topk=2, window=2)
    q = torch.randn(2, 12, 2, head_dim, dtype=torch.float64)
    return cache, [(q[:, t], k[:, t], v[:, t], scores[:, t]) for t in range(9, 12)]


@pytest.mark.parametrize("bad", [
    dict(gate="kvx"), dict(scale=-1.0), dict(scale=float("nan")), dict(backend="cuda"),
    dict(q_dtype=torch.float32), dict(k_dtype=torch.float32), dict(nan_score=True),
])
def test_failed_step_leaves_the_cache_unchanged(bad):
    """Whatever fails (checks before the append, or decode_attention after it), the state is untouched and a
    retry decodes like a cache that never saw the failed call."""
    cache, steps = small_cache()
    clean = copy.deepcopy(cache)
    q, k, v, u = steps[0]
    kwargs = {name: bad[name] for name in ("gate", "scale", "backend") if name in bad}
    q_bad = q.to(bad.get("q_dtype", q.dtype))
    k_bad = k.to(bad.get("k_dtype", k.dtype))
    u_bad = u.clone()
    if bad.get("nan_score"):
        u_bad[1, 0] = torch.nan
    with pytest.raises(ValueError):
        cache.step(q_bad, k_bad, v, u_bad, **kwargs)
    assert_same_state(cache, clean)
    for inputs in steps:
        torch.testing.assert_close(cache.step(*inputs), clean.step(*inputs), atol=0, rtol=0)
    assert_same_state(cache, clean)


def test_failed_kernel_dispatch_is_undone():
    """backend="triton" with a head dim the kernel does not take fails only when dispatching, after the
    append: the step must still leave no trace."""
    pytest.importorskip("triton")
    cache, steps = small_cache(head_dim=6)
    clean = copy.deepcopy(cache)
    with pytest.raises(ValueError, match="triton"):
        cache.step(*steps[0], backend="triton")
    assert_same_state(cache, clean)


@pytest.mark.parametrize("index,message", [
    (torch.tensor([0, 2]), r"index must hold rows in \[-2, 2\)"), (torch.tensor([-3]), r"index must hold rows in"),
    (torch.tensor([0.0, 1.0]), "index must be a 1-D integer tensor"), (torch.tensor([[0, 1]]), "index must be a 1-D"),
    (torch.tensor([True, False]), "index must be a 1-D"), ([0, 1.0], "index must be a 1-D"), (1, "index must be a 1-D"),
])
def test_select_rows_refuses_a_bad_index_before_changing_anything(index, message):
    """A row out of [-B, B) (a device assert on CUDA), a float, bool or 2-D index: ValueError naming index, the
    cache untouched and still decoding."""
    cache, steps = small_cache()
    clean = copy.deepcopy(cache)
    with pytest.raises(ValueError, match=message):
        cache.select_rows(index)
    assert_same_state(cache, clean)
    torch.testing.assert_close(cache.step(*steps[0]), clean.step(*steps[0]), atol=0, rtol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_step_rejects_non_finite_scores(value):
    """A NaN score is never selected yet moves tau for the others: refused, naming the score, as
    sparsek_attention refuses it."""
    cache, steps = small_cache()
    q, k, v, u = steps[0]
    u = u.clone()
    u[1, 0] = value
    with pytest.raises(ValueError, match=r"scores contain NaN or inf: scores\[1, 0\]"):
        cache.step(q, k, v, u)
    with pytest.raises(ValueError, match="NaN or inf"):
        cache.append(k, v, u)
    with pytest.raises(ValueError, match="NaN or inf"):
        sparsek_attention(q[:, None], k[:, None], v[:, None], u[:, None], topk=2, window=2)


def test_rejects_bad_max_kept():
    for max_kept in (2, 0, 3.5, True, "all", None):
        with pytest.raises(ValueError, match="max_kept"):
            SparseKCache(1, 1, 4, topk=2, window=1, dtype=torch.float32, max_kept=max_kept)


def decode_all(scores, *, topk, window, gate="kv", max_kept="auto", check=None):
    """Decode T tokens from an empty cache -> (outputs [B, T, Hq, D], q, k, v, the cache); check(cache, t) runs
    after every step."""
    torch.manual_seed(1)
    batch, t_len, heads = scores.shape
    q = torch.randn(batch, t_len, 2 * heads, 8, dtype=torch.float64)
    k, v = (torch.randn(batch, t_len, heads, 8, dtype=torch.float64) for _ in range(2))
    cache = SparseKCache.prefill(k[:, :0], v[:, :0], scores[:, :0], topk=topk, window=window, max_kept=max_kept)
    outs = []
    for t in range(t_len):
        outs.append(cache.step(q[:, t], k[:, t], v[:, t], scores[:, t], gate=gate))
        if check is not None:
            check(cache, t)
    return torch.stack(outs, 1), q, k, v, cache


def test_cache_bytes_bounded_with_bunched_scores():
    """Scores all within 1 of each other keep every candidate alive, yet with the default max_kept every tensor
    the cache holds keeps its size: max_kept float64 scores per (row, KV head)."""
    torch.manual_seed(2)
    topk, window, steps = 4, 2, 1500
    scores = torch.rand(1, steps, 2)
    sizes = []
    _, _, _, _, cache = decode_all(scores, topk=topk, window=window,
                                   check=lambda cache, t: sizes.append((cache.nbytes(), cache.kv_bytes())))
    assert cache.max_kept == 64 and cache.kept_u.shape == (1, 2, cache.max_kept)
    assert len(set(sizes)) == 1
    assert (cache.dropped_u > -torch.inf).all()                        # the bound did cut: nothing grew instead


def test_bounded_cache_exact_with_a_recency_slope():
    """The scorer's regime (slope 0.01 per position plus noise): many scores lie within 1 of the k-th best, so
    the default bound does cut live scores, yet tau never falls below them: decoding equals the parallel
    forward."""
    torch.manual_seed(3)
    topk, window, t_len = 2, 3, 400
    scores = (torch.rand(2, t_len, 1) + 0.01 * torch.arange(t_len)[:, None]).double()
    exact = []
    got, q, k, v, cache = decode_all(scores, topk=topk, window=window,
                                     check=lambda cache, t: exact.append(bool(cache.exact().all())))
    assert (cache.dropped_u > -torch.inf).all()                       # the bound dropped live scores
    assert all(exact)
    want = sparsek_attention(q, k, v, scores, topk=topk, window=window, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_bounded_cache_past_the_bound():
    """Stationary bunched scores with a small bound: the selection (gate "none") stays exact; tau equals the
    unbounded cache's (to rounding) exactly where exact() says so, and is lower elsewhere."""
    torch.manual_seed(4)
    topk, window, t_len, max_kept = 3, 2, 300, 8
    scores = torch.rand(1, t_len, 2, dtype=torch.float64)
    got, q, k, v, _ = decode_all(scores, topk=topk, window=window, gate="none", max_kept=max_kept)
    want = sparsek_attention(q, k, v, scores, topk=topk, window=window, gate="none", backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)

    free = SparseKCache.prefill(k[:, :0], v[:, :0], scores[:, :0], topk=topk, window=window, max_kept=t_len)
    verdicts = []

    def compare(cache, t):
        free.step(q[:, t], k[:, t], v[:, t], scores[:, t])
        assert torch.equal(cache.positions, free.positions) and torch.equal(cache.keys, free.keys)
        tau, tau_free, exact = cache.threshold(), free.threshold(), cache.exact()
        finite = tau_free > -torch.inf
        gap = torch.where(finite, tau_free - tau, 0)
        assert (gap[exact].abs() <= 1e-12).all() and (gap[~exact] > 1e-12).all()
        verdicts.extend(exact.flatten().tolist())

    decode_all(scores, topk=topk, window=window, max_kept=max_kept, check=compare)
    assert any(verdicts) and not all(verdicts)                         # both cases happen
