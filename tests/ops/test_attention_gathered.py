"""The gathered CPU path (ops/attention/gathered.py) against the float64 dense reference: outputs and all four
gradients, non-finite keys, packed sequences and the "auto" dispatch.

Most tests shrink the blocks to 4 queries and the chunks to a few blocks, so short sequences run through many
blocks, several chunks and a partial last block.
"""

from __future__ import annotations

import pytest
import torch

from sparsek.ops.attention import gathered, interface
from sparsek.ops.attention.gathered import sparsek_attention_gathered
from sparsek.ops.attention.interface import sparsek_attention
from sparsek.ops.attention.reference import sparsek_attention_reference
from sparsek.ops.select import native, prefix_selection


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(gathered, "BLOCK", 4)
    monkeypatch.setattr(gathered, "_CHUNK_ELEMENTS", 1024)   # a few blocks per chunk on these shapes


def make_inputs(batch, t_len, n_q_heads, n_kv_heads, head_dim, dtype=torch.float64, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    scores = torch.randint(-2, 3, (batch, t_len, n_kv_heads), generator=g).double() if ties \
        else 0.7 * randn(batch, t_len, n_kv_heads)
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [randn(batch, t_len, n_q_heads, head_dim).to(dtype), randn(batch, t_len, n_kv_heads, head_dim).to(dtype),
            randn(batch, t_len, n_kv_heads, head_dim).to(dtype), scores.to(score_dtype)]


def outputs_and_grads(attention, inputs, cotangent, **kwargs):
    """[out, dq, dk, dv, dscores] (a gradient that does not reach its input is None)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = attention(*inputs, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, inputs, cotangent.to(out.dtype), allow_unused=True)]


def exact(inputs, cotangent, **kwargs):
    return outputs_and_grads(sparsek_attention_reference, [x.double() for x in inputs], cotangent.double(), **kwargs)


def assert_matches_reference(inputs, atol, **kwargs):
    cotangent = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    want = exact(inputs, cotangent, **kwargs)
    for name, g, w in zip(["out", "dq", "dk", "dv", "dscores"], got, want):
        if kwargs.get("gate") == "none" and name == "dscores":
            assert g is None and w is None, "gate 'none' must not send gradient to the scores"
            continue
        assert g.dtype == (inputs[3] if name == "dscores" else inputs[0]).dtype
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    # batch, T, Hq, Hk, D, topk, window, gate
    (1, 23, 2, 2, 8, 3, 2, "kv"),         # T not a multiple of the block
    (2, 23, 4, 2, 8, 3, 2, "v"),          # batch 2, GQA 4/2
    (1, 30, 4, 1, 8, 4, 3, "none"),       # GQA 4/1
    (2, 21, 4, 2, 8, 5, 0, "kv"),         # no window
    (1, 21, 4, 2, 8, 5, 0, "v"),
    (1, 19, 2, 1, 8, 0, 3, "kv"),         # window only
    (1, 17, 2, 1, 8, 40, 2, "kv"),        # topk >= T: full causal attention
    (1, 17, 2, 1, 8, 3, 40, "v"),         # window >= T
    (1, 26, 4, 2, 8, 1, 1, "kv"),
    (1, 1, 2, 1, 8, 1, 0, "kv"),          # one token
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("keep", ["kept", "recomputed"])
def test_matches_reference_float64(small_blocks, monkeypatch, case, keep):
    """The backward from the chunks the forward kept, and from chunks it recomputes (long rows)."""
    if keep == "recomputed":
        monkeypatch.setattr(gathered, "_KEEP_ELEMENTS", 0)
    batch, t_len, hq, hk, d, topk, window, gate = case
    inputs = make_inputs(batch, t_len, hq, hk, d, seed=t_len + topk)
    assert_matches_reference(inputs, atol=1e-12, topk=topk, window=window, gate=gate)


@pytest.mark.parametrize("gate", ["kv", "v", "none"])
def test_default_blocks(gate):
    """The module's own block and chunk sizes, over a few blocks and a partial last one."""
    inputs = make_inputs(2, 75, 4, 2, 8, seed=3)
    assert_matches_reference(inputs, atol=1e-12, topk=6, window=5, gate=gate)


@pytest.mark.parametrize("gate", ["kv", "v"])
def test_tied_scores(small_blocks, gate):
    """Integer scores tie everywhere: ties go to the newer key, as in the reference (same selection, so the
    gradients agree too)."""
    inputs = make_inputs(2, 29, 4, 2, 8, seed=5, ties=True)
    assert_matches_reference(inputs, atol=1e-12, topk=4, window=2, gate=gate)


@pytest.mark.parametrize("gate", ["kv", "v", "none"])
def test_float32_error_within_twice_pytorch_float32(small_blocks, gate):
    """float32 in float32: error against float64 at most 2x that of the reference computed in float32."""
    kwargs = dict(topk=5, window=3, gate=gate)
    inputs = make_inputs(2, 37, 4, 2, 16, dtype=torch.float32, seed=7)
    cotangent = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    plain = outputs_and_grads(sparsek_attention_reference, inputs, cotangent, **kwargs)
    want = exact(inputs, cotangent, **kwargs)
    for name, g, p, w in zip(["out", "dq", "dk", "dv", "dscores"], got, plain, want):
        if w is None:
            continue
        assert g.dtype == torch.float32
        err, err_plain = (g.double() - w).abs().max().item(), (p.double() - w).abs().max().item()
        assert err <= 2 * err_plain + 1e-6, f"{name}: {err} vs the float32 reference's {err_plain}"


def test_half_precision_is_computed_in_float32(small_blocks):
    inputs = make_inputs(1, 21, 2, 1, 8, dtype=torch.float16, seed=9)
    out = sparsek_attention_gathered(*inputs, topk=3, window=2)
    assert out.dtype == torch.float16
    want = sparsek_attention_reference(*[x.double() for x in inputs], topk=3, window=2)
    torch.testing.assert_close(out.double(), want, atol=5e-3, rtol=0)


@pytest.mark.parametrize("gate", ["kv", "none"])
def test_packed_sequences_through_the_interface(small_blocks, gate):
    """cu_seqlens with backend="gather": each sequence on its own, as the reference backend does."""
    inputs = make_inputs(1, 40, 4, 2, 8, seed=11)
    kwargs = dict(topk=3, window=2, gate=gate, cu_seqlens=torch.tensor([0, 9, 9, 30, 40]))
    cotangent = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = outputs_and_grads(lambda *a, **k: sparsek_attention(*a, backend="gather", **k), inputs, cotangent, **kwargs)
    want = outputs_and_grads(lambda *a, **k: sparsek_attention(*a, backend="reference", **k), inputs, cotangent,
                             **kwargs)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def attending(scores, topk, window, key, batch, head):
    """The queries that attend key `key` of (batch, KV head): its selection range and its window."""
    sel = prefix_selection(scores, topk, window)
    start, end = int(sel.start[batch, key, head]), int(sel.end[batch, key, head])
    return sorted(set(range(start, end)) | set(range(key, min(key + window, scores.shape[1]))))


@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("key", [4, 11, 22])
def test_non_finite_key_reaches_only_its_queries(small_blocks, tensor, key):
    """A NaN in k or v of one key: exactly the rows of the queries attending it are non-finite; the other rows
    equal the clean reference, and so do their gradients (the loss over those rows) for the queries and for
    every key those attending queries do not touch."""
    topk, window, batch, head = 2, 2, 1, 0
    q, k, v, u = make_inputs(2, 23, 4, 2, 8, seed=key)
    poisoned = {"k": k.clone(), "v": v.clone()}
    poisoned[tensor][batch, key, head, 3] = float("nan")
    rows = attending(u, topk, window, key, batch, head)
    group = q.shape[2] // k.shape[2]
    bad_rows = torch.zeros(q.shape[:3], dtype=torch.bool)
    bad_rows[batch, rows, head * group:(head + 1) * group] = True

    def loss_and_grads(k_in, v_in):
        inputs = [x.clone().requires_grad_() for x in (q, k_in, v_in)]
        out = sparsek_attention_gathered(*inputs, u, topk=topk, window=window)
        return out.detach(), torch.autograd.grad(out[~bad_rows].sum(), inputs)

    out, grads = loss_and_grads(poisoned["k"], poisoned["v"])
    clean, clean_grads = loss_and_grads(k, v)
    assert torch.equal(~torch.isfinite(out).all(-1), bad_rows)
    torch.testing.assert_close(out[~bad_rows], clean[~bad_rows], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0][~bad_rows], clean_grads[0][~bad_rows], atol=1e-12, rtol=0)
    assert torch.isfinite(grads[0][~bad_rows]).all()
    # Keys that no attending query reads keep clean gradients.
    sel = prefix_selection(u, topk, window)
    i = torch.tensor(rows).view(-1, 1)
    j = torch.arange(k.shape[1])
    touched = ((sel.start[batch, :, head] <= i) & (i < sel.end[batch, :, head]) | (j <= i) & (j > i - window)).any(0)
    for got, want in zip(grads[1:], clean_grads[1:]):
        untouched = got[batch, ~touched, head]
        assert torch.isfinite(untouched).all()
        torch.testing.assert_close(untouched, want[batch, ~touched, head], atol=1e-12, rtol=0)
        torch.testing.assert_close(got[1 - batch], want[1 - batch], atol=1e-12, rtol=0)


def test_nan_value_at_the_last_position(small_blocks):
    """A NaN v at the last position is attended by the last query only: every other output and its query
    gradient stay finite and equal the clean reference."""
    q, k, v, u = make_inputs(1, 27, 4, 2, 8, seed=13)
    v_bad = v.clone()
    v_bad[0, -1, 1] = float("nan")
    q_in = q.clone().requires_grad_()
    out = sparsek_attention_gathered(q_in, k, v_bad, u, topk=3, window=3)
    want = sparsek_attention_reference(q, k, v, u, topk=3, window=3)
    assert torch.isnan(out[0, -1, 2:]).all() and torch.isfinite(out[0, -1, :2]).all()
    torch.testing.assert_close(out[0, :-1], want[0, :-1], atol=1e-12, rtol=0)
    out[0, :-1].sum().backward()
    assert torch.isfinite(q_in.grad[0, :-1]).all()


def test_auto_takes_gather_on_cpu_with_the_native_selection():
    assert native.available()
    assert interface.gather_is_cheaper(20, 3, 2) and interface.gather_is_cheaper(4096, 64, 64)


def test_auto_takes_gather_for_long_sequences_on_cpu(monkeypatch):
    """Without a C compiler (the selection in PyTorch): only where the reference's O(T^2) work costs more."""
    monkeypatch.setattr(native, "available", lambda: False)
    assert interface.gather_is_cheaper(4096, 64, 64) and not interface.gather_is_cheaper(20, 3, 2)
    assert not interface.gather_is_cheaper(200, 64, 64)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape[1])
        return sparsek_attention_gathered(*args, **kwargs)

    monkeypatch.setattr(interface, "sparsek_attention_gathered", spy)
    long_inputs = make_inputs(1, 256, 2, 1, 8, dtype=torch.float32)
    sparsek_attention(*long_inputs, topk=8, window=8)
    assert calls == [256]
    sparsek_attention(*make_inputs(1, 20, 2, 1, 8, dtype=torch.float32), topk=3, window=2)
    sparsek_attention(*long_inputs, topk=8, window=8, backend="reference")
    assert calls == [256]


@pytest.mark.parametrize("backend", ["gather", "reference", "auto"])
def test_empty_batch(backend):
    """B = 0: an empty output on every CPU backend (the gathered path divided by its zero rows)."""
    q, k, v, scores = make_inputs(1, 10, 2, 1, 8)
    q, k, v, scores = q[:0], k[:0], v[:0], scores[:0]
    out = sparsek_attention(q, k, v, scores, topk=2, window=2, backend=backend)
    assert out.shape == q.shape
