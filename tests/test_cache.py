"""SparseKCache: decoding token by token equals the parallel forward, with KV memory that does not grow."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsek.cache import SparseKCache
from tests.reference import naive_sparsek_attention


def decode(q, k, v, scores, prompt_len, **kwargs):
    """Prefill the first prompt_len tokens, then decode the rest one at a time -> outputs [B, T - P, Hq, D]."""
    gate = kwargs.pop("gate", "kv")
    cache = SparseKCache.prefill(k[:, :prompt_len], v[:, :prompt_len], scores[:, :prompt_len], **kwargs)
    outs = [cache.step(q[:, t], k[:, t], v[:, t], scores[:, t], gate=gate) for t in range(prompt_len, q.shape[1])]
    return torch.stack(outs, dim=1), cache


@pytest.mark.parametrize("gate", ["kv", "v", "none"])
@pytest.mark.parametrize("topk,window,prompt_len", [
    (4, 3, 0), (4, 3, 5), (4, 3, 20), (1, 0, 6), (6, 0, 0), (0, 5, 4), (3, 1, 11), (40, 2, 9), (3, 40, 9),
])
@pytest.mark.parametrize("ties", [False, True])
def test_decode_equals_parallel(gate, topk, window, prompt_len, ties):
    """Prompts shorter and longer than topk + window, windows 0 and > T, topk 0 and > T, GQA 2, tied scores."""
    torch.manual_seed(topk * 100 + window * 10 + prompt_len)
    batch, t_len, heads, group, dim = 2, 30, 2, 2, 8
    q = torch.randn(batch, t_len, heads * group, dim, dtype=torch.float64)
    k, v = (torch.randn(batch, t_len, heads, dim, dtype=torch.float64) for _ in range(2))
    scores = torch.randint(0, 3, (batch, t_len, heads)).float() if ties else torch.randn(batch, t_len, heads) * 2
    want = naive_sparsek_attention(q, k, v, scores.double(), topk=topk, window=window, gate=gate)
    got, _ = decode(q, k, v, scores, prompt_len, topk=topk, window=window, gate=gate)
    torch.testing.assert_close(got, want[:, prompt_len:], atol=1e-10, rtol=1e-10)


def test_kv_memory_constant_past_the_budget():
    """Measured from the cache's tensors while decoding to 4x past topk + window."""
    topk, window, heads, dim = 8, 4, 2, 16
    t_len = 4 * (topk + window) + 5
    q = torch.randn(1, t_len, heads, dim)
    k, v = (torch.randn(1, t_len, heads, dim) for _ in range(2))
    scores = torch.randn(1, t_len, heads)
    cache = SparseKCache.prefill(k[:, :0], v[:, :0], scores[:, :0], topk=topk, window=window)
    sizes = []
    for t in range(t_len):
        cache.step(q[:, t], k[:, t], v[:, t], scores[:, t])
        sizes.append(cache.kv_bytes())
    assert len(set(sizes)) == 1
    assert sizes[0] == 2 * heads * (topk + window) * dim * k.element_size()


def test_rejects_empty_budget():
    with pytest.raises(ValueError, match="not both 0"):
        SparseKCache(1, 1, 4, topk=0, window=0, dtype=torch.float32)


def test_window_only_cache_keeps_no_scores():
    """With topk = 0 nothing can be selected: the cache must not accumulate candidate scores either."""
    cache = SparseKCache(1, 1, 4, topk=0, window=3, dtype=torch.float32)
    for _ in range(50):
        cache.step(torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 1))
    assert cache.kept_u.numel() == 0


@pytest.mark.parametrize("topk,window", [(4, 3), (3, 0), (0, 4), (20, 2)])
def test_rows_of_different_lengths(topk, window):
    """Left-padded prompts of lengths 0..T: every row decodes as if it were alone."""
    torch.manual_seed(topk + window)
    t_len, prompt_len, heads, dim = 26, 14, 2, 8
    lengths = torch.tensor([14, 9, 1, 0])
    q = torch.randn(4, t_len, heads * 2, dim, dtype=torch.float64)
    k, v = (torch.randn(4, t_len, heads, dim, dtype=torch.float64) for _ in range(2))
    scores = torch.randn(4, t_len, heads) * 2
    cache = SparseKCache.prefill(k[:, :prompt_len], v[:, :prompt_len], scores[:, :prompt_len], topk=topk,
                                 window=window, lengths=lengths)
    got = torch.stack([cache.step(q[:, t], k[:, t], v[:, t], scores[:, t]) for t in range(prompt_len, t_len)], 1)
    for row, n in enumerate(lengths.tolist()):
        first = prompt_len - n                                         # where the row's real tokens begin
        want = naive_sparsek_attention(q[row:row + 1, first:], k[row:row + 1, first:], v[row:row + 1, first:],
                                       scores[row:row + 1, first:].double(), topk=topk, window=window)
        torch.testing.assert_close(got[row], want[0, n:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("topk,window,max_kept", [(2, 3, 8), (3, 0, "auto"), (1, 5, 2)])
def test_kept_scores_fill_a_prefix_of_the_buffer(topk, window, max_kept):
    """What a cache step scanning only the filled columns relies on (docs/kernels.md, "Decode step"): after a
    left-padded prefill and steps with ties, candidates that lose to the whole buffer and a full buffer, the
    finite kept scores of each row and head fill a prefix of the columns, at most one per candidate so far."""
    torch.manual_seed(3)
    lengths = torch.tensor([9, 4, 0])
    k, v = (torch.randn(3, 9, 2, 4) for _ in range(2))
    cache = SparseKCache.prefill(k, v, torch.randint(0, 3, (3, 9, 2)).float(), topk=topk, window=window,
                                 lengths=lengths, max_kept=max_kept)
    for t in range(40):
        scores = torch.randint(0, 3, (3, 2)).float()
        if t % 7 == 3:
            scores[1, 0] = -1e9                                          # dropped once the buffer is full
        cache.step(torch.randn(3, 4, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4), scores)
        finite = torch.isfinite(cache.kept_u)                            # [B, H, C]
        n_finite = finite.sum(-1, keepdim=True)
        assert torch.equal(finite, torch.arange(finite.shape[-1]) < n_finite), t
        seen = (cache.lengths - window).clamp(min=0)                     # candidates each row has seen
        assert (n_finite[..., 0] <= seen[:, None]).all(), t


def test_select_rows_reorders_the_state():
    k, v = (torch.randn(3, 9, 1, 4) for _ in range(2))
    cache = SparseKCache.prefill(k, v, torch.randn(3, 9, 1), topk=2, window=2)
    keys = cache.keys.clone()
    cache.select_rows(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.keys, keys[[2, 2, 0]])


def test_select_rows_negative_rows_and_lists():
    """Rows in [-B, 0) count from the end, as in Python indexing; a list of ints works like the tensor."""
    k, v = (torch.randn(3, 9, 1, 4) for _ in range(2))
    cache = SparseKCache.prefill(k, v, torch.randn(3, 9, 1), topk=2, window=2)
    other = copy.deepcopy(cache)
    cache.select_rows(torch.tensor([-1, 0, -3]))
    other.select_rows([2, 0, 0])
    for name in SparseKCache._STATE:
        assert torch.equal(getattr(cache, name), getattr(other, name)), name


def test_select_rows_repeated_rows_decode_independently():
    """A row repeated by select_rows (sampling) is a copy: stepping one copy leaves the other as the original."""
    torch.manual_seed(5)
    k, v = (torch.randn(2, 9, 1, 4, dtype=torch.float64) for _ in range(2))
    cache = SparseKCache.prefill(k, v, torch.randn(2, 9, 1), topk=2, window=2)
    single = copy.deepcopy(cache)
    single.select_rows(torch.tensor([1]))
    cache.select_rows(torch.tensor([1, 1]))
    for _ in range(6):
        q, kk, vv = (torch.randn(2, heads, 4, dtype=torch.float64) for heads in (2, 1, 1))
        u = torch.randn(2, 1)
        out = cache.step(q, kk, vv, u)
        torch.testing.assert_close(out[:1], single.step(q[:1], kk[:1], vv[:1], u[:1]), atol=0, rtol=0)


def test_prefill_rejects_bad_lengths():
    k = torch.randn(2, 5, 1, 4)
    with pytest.raises(ValueError, match="lengths"):
        SparseKCache.prefill(k, k, torch.randn(2, 5, 1), topk=2, window=2, lengths=torch.tensor([6, 1]))


@pytest.mark.parametrize("name,value", [("topk", 2.0), ("topk", True), ("topk", "2"), ("topk", -1),
                                        ("window", 2.0), ("window", None), ("window", -1)])
def test_prefill_names_a_bad_topk_or_window(name, value):
    """topk and window must be ints >= 0 (not floats or bools): the error names the argument."""
    k = torch.randn(2, 5, 1, 4)
    budget = {"topk": 2, "window": 2, name: value}
    with pytest.raises(ValueError, match=rf"^{name} must be an int >= 0, got {value!r}"):
        SparseKCache.prefill(k, k, torch.randn(2, 5, 1), **budget)


@pytest.mark.parametrize("lengths", [[5, 3], (5, 3)])
def test_prefill_takes_lengths_as_a_list(lengths):
    """lengths as a list (or tuple) of ints gives the cache of the equal tensor."""
    torch.manual_seed(0)
    k, v = (torch.randn(2, 5, 1, 4) for _ in range(2))
    scores = torch.randn(2, 5, 1)
    got = SparseKCache.prefill(k, v, scores, topk=2, window=1, lengths=lengths)
    want = SparseKCache.prefill(k, v, scores, topk=2, window=1, lengths=torch.tensor([5, 3]))
    for name in SparseKCache._STATE:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("lengths", [torch.tensor([5.0, 2.5]), [5, 2.5], [5, True], "53", torch.tensor([[5, 3]]),
                                     [5], [5, 6], [5, -1]])
def test_prefill_names_bad_lengths(lengths):
    """Non-integer lengths (a float 2.5 used to be truncated), a wrong shape or an out-of-range length: the
    error names lengths."""
    k = torch.randn(2, 5, 1, 4)
    with pytest.raises(ValueError, match=r"^lengths must be"):
        SparseKCache.prefill(k, k, torch.randn(2, 5, 1), topk=2, window=2, lengths=lengths)


@pytest.mark.parametrize("name", ["k", "v", "scores"])
def test_prefill_names_a_missing_tensor(name):
    k = torch.randn(2, 5, 1, 4)
    tensors = {"k": k, "v": k, "scores": torch.randn(2, 5, 1), name: None}
    with pytest.raises(ValueError, match=rf"^{name} must be a tensor"):
        SparseKCache.prefill(tensors["k"], tensors["v"], tensors["scores"], topk=2, window=2)


def test_long_decode_keeps_its_buffers():
    """Many near-tied candidates, a kept-score buffer as long as the context (exact whatever the scores): the
    outputs equal the parallel forward, and no step reallocates a tensor of the cache (CUDA-graph safe)."""
    torch.manual_seed(3)
    t_len, topk, window = 120, 2, 1
    q = torch.randn(1, t_len, 2, 8, dtype=torch.float64)
    k, v = (torch.randn(1, t_len, 1, 8, dtype=torch.float64) for _ in range(2))
    scores = torch.randint(0, 4, (1, t_len, 1)).float() * 0.5            # many near-ties: wide kept sets
    want = naive_sparsek_attention(q, k, v, scores.double(), topk=topk, window=window)
    got, cache = decode(q[:, :60], k[:, :60], v[:, :60], scores[:, :60], 5, topk=topk, window=window,
                        max_kept=t_len)
    buffers = [getattr(cache, name) for name in SparseKCache._STATE]
    rest = [cache.step(q[:, t], k[:, t], v[:, t], scores[:, t]) for t in range(60, t_len)]
    assert all(getattr(cache, name) is x for name, x in zip(SparseKCache._STATE, buffers))
    torch.testing.assert_close(torch.cat([got, torch.stack(rest, 1)], 1), want[:, 5:], atol=1e-10, rtol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_replays_from_a_cuda_graph():
    """A step holds no host state: a captured step replayed n times decodes like eager steps."""
    torch.manual_seed(0)
    t_len, prompt_len, topk, window = 200, 40, 16, 8
    q = torch.randn(2, t_len, 4, 64, device="cuda")
    k, v = (torch.randn(2, t_len, 2, 64, device="cuda") for _ in range(2))
    scores = torch.randn(2, t_len, 2, device="cuda")
    eager, _ = decode(q, k, v, scores, prompt_len, topk=topk, window=window)
    cache = SparseKCache.prefill(k[:, :prompt_len], v[:, :prompt_len], scores[:, :prompt_len], topk=topk,
                                 window=window)
    inputs = [x[:, prompt_len].clone() for x in (q, k, v, scores)]
    snapshot = copy.deepcopy(cache)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cache.step(*inputs)                                         # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    cache.copy_(snapshot)                                           # undo the warm-up in place
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.step(*inputs)
    replayed = []
    for t in range(prompt_len, t_len):
        for buffer, x in zip(inputs, (q, k, v, scores)):
            buffer.copy_(x[:, t])
        graph.replay()
        replayed.append(out.clone())
    torch.testing.assert_close(torch.stack(replayed, 1), eager, atol=1e-5, rtol=1e-5)


def test_float64_scores_decode_like_the_parallel_path():
    """Scores 1e-12 apart tie in float32: the cache must keep them in float64, as the parallel path selects."""
    u = torch.tensor([0.0, 1 + 1e-12, 1.0, 1 + 2e-12, -3.0, -3.0, -3.0], dtype=torch.float64).view(1, 7, 1)
    q, k, v = (torch.randn(1, 7, 1, 8, dtype=torch.float64) for _ in range(3))
    want = naive_sparsek_attention(q, k, v, u, topk=2, window=1)
    got, _ = decode(q, k, v, u, 3, topk=2, window=1)
    torch.testing.assert_close(got, want[:, 3:], atol=1e-10, rtol=1e-10)


def test_step_rejects_bad_shapes():
    cache = SparseKCache.prefill(torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1), topk=2,
                                 window=2)
    with pytest.raises(ValueError, match="needs q"):
        cache.step(torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.randn(2, 2))


def test_pytorch_step_traces_into_one_graph():
    """No graph break and no host synchronisation in a decode step (the PyTorch path; on CUDA the fused one
    is checked in tests/ops/test_cache_step.py): compiled with fullgraph=True it decodes like the eager step,
    over enough steps to fill the slots and the kept-score buffer (max_kept 6) and drop scores."""
    torch.manual_seed(4)
    q = torch.randn(2, 40, 4, 8)
    k, v = (torch.randn(2, 40, 2, 8) for _ in range(2))
    scores = torch.randint(0, 3, (2, 40, 2)).float()
    eager = SparseKCache.prefill(k[:, :5], v[:, :5], scores[:, :5], topk=3, window=2, max_kept=6, lengths=[5, 2])
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled.step, backend="eager", fullgraph=True)
    explained = torch._dynamo.explain(copy.deepcopy(eager).step)(q[:, 5], k[:, 5], v[:, 5], scores[:, 5])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    for t in range(5, 40):
        want = eager.step(q[:, t], k[:, t], v[:, t], scores[:, t])
        torch.testing.assert_close(step(q[:, t], k[:, t], v[:, t], scores[:, t]), want, atol=0, rtol=0)
    assert (eager.dropped_u > -torch.inf).any()
    for name in SparseKCache._STATE:
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    # Compiled code cannot raise on a NaN score (that waits for the device): the row's output is NaN for that
    # step only, and the token is cached with score -inf.
    bad = scores[:, 39].clone()
    bad[1, 0] = torch.nan
    out = step(q[:, 39], k[:, 39], v[:, 39], bad)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert compiled.scores[1, 0, (compiled.lengths[1] - 1) % 2] == -torch.inf
    assert torch.isfinite(step(q[:, 38], k[:, 38], v[:, 38], scores[:, 38])).all()
