"""Baseline attentions (sparsek.baselines) against a naive per-query float64 oracle.

The oracle's masks are built here from the definitions with plain Python loops (the hash buckets and the sorted
chunks included), so neither the attention nor the mask helpers are checked against themselves.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsek.baselines import attention as attention_module
from sparsek.baselines import (
    fixed_attention,
    fixed_mask,
    full_attention,
    hash_attention,
    hash_mask,
    window_attention,
    window_mask,
)

# ---------------------------------------------------------------------------------------------
# helpers: inputs, masks by definition, the oracle
# ---------------------------------------------------------------------------------------------


def make_inputs(B, T, Hq, Hk, D, *, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hk, Hk))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def make_rotations(Hk, D, R, *, seed=1):
    return torch.randn(Hk, D, R, generator=torch.Generator().manual_seed(seed))


def loop_mask(T, allowed) -> torch.Tensor:
    """[T, T] bool from a predicate allowed(i, j), evaluated one pair at a time."""
    return torch.tensor([[allowed(i, j) for j in range(T)] for i in range(T)], dtype=torch.bool)


def window_by_definition(T, window):
    return loop_mask(T, lambda i, j: j <= i and i - j < window)


def fixed_by_definition(T, local, stride):
    return loop_mask(T, lambda i, j: j <= i and (i - j < local or j % stride == stride - 1))


def hash_buckets_by_definition(k, rotations) -> list[list[list[int]]]:
    """buckets[b][h][t] = argmax of concat(u R_h, -u R_h) for the unit key u = k[b, t, h] (float32)."""
    B, T, Hk, _ = k.shape
    out = [[[0] * T for _ in range(Hk)] for _ in range(B)]
    for b in range(B):
        for h in range(Hk):
            for t in range(T):
                key = k[b, t, h].float()
                proj = (key / key.norm()) @ rotations[h].float()
                out[b][h][t] = int(torch.cat([proj, -proj]).argmax())
    return out


def hash_by_definition(k, rotations, chunk) -> torch.Tensor:
    """[B, Hk, T, T]: sort tokens by (bucket, position), cut into chunks, attend own + previous chunk, causal."""
    B, T, Hk, _ = k.shape
    buckets = hash_buckets_by_definition(k, rotations)
    mask = [[None] * Hk for _ in range(B)]
    for b in range(B):
        for h in range(Hk):
            ordered = sorted(range(T), key=lambda t, bh=buckets[b][h]: (bh[t], t))
            chunk_of = {token: rank // chunk for rank, token in enumerate(ordered)}
            mask[b][h] = [[j <= i and chunk_of[j] in (chunk_of[i], chunk_of[i] - 1) for j in range(T)]
                          for i in range(T)]
    return torch.tensor(mask, dtype=torch.bool)


def oracle(q, k, v, mask, scale=None):
    """Per-query masked softmax in float64. mask: [T, T] or [B, Hk, T, T] bool (True = attend)."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double().repeat_interleave(group, dim=2), v.double().repeat_interleave(group, dim=2)
    mask = mask.expand(B, k.shape[2] // group, T, T).repeat_interleave(group, dim=1)   # [B, Hq, T, T]
    rows = []
    for i in range(T):
        logits = torch.einsum("bhd,bjhd->bhj", q[:, i], k) * scale                       # [B, Hq, T]
        probs = logits.masked_fill(~mask[:, :, i], float("-inf")).softmax(dim=-1)
        rows.append(torch.einsum("bhj,bjhd->bhd", probs, v))
    return torch.stack(rows, dim=1)


def check_against_oracle(fn, q, k, v, mask, scale=None, atol=1e-10):
    """Output and gradients (q, k, v) of fn against the oracle with the same mask, all float64."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    ref = oracle(*ref_leaves, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    cotangent = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, cotangent)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cotangent)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=atol, rtol=0, msg=lambda m, name=name: f"grad {name}: {m}")


HEADS = [(4, 2), (4, 4), (4, 1)]  # (Hq, Hk): GQA 2, MHA, MQA


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second OpenMP thread only waits, up to 100x slower when another process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------------------------------------
# mask helpers against the definitions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 13, 37])
@pytest.mark.parametrize("window", [1, 3, 8, 37, 100])
def test_window_mask_matches_definition(T, window):
    mask = window_mask(T, window)
    assert mask.dtype == torch.bool and mask.shape == (T, T)
    assert torch.equal(mask, window_by_definition(T, window))


@pytest.mark.parametrize("T", [1, 13, 37])
@pytest.mark.parametrize("local,stride", [(1, 1), (1, 4), (4, 8), (3, 5), (8, 3), (16, 100)])
def test_fixed_mask_matches_definition(T, local, stride):
    mask = fixed_mask(T, local, stride)
    assert mask.dtype == torch.bool and mask.shape == (T, T)
    assert torch.equal(mask, fixed_by_definition(T, local, stride))


@pytest.mark.parametrize("T,chunk,R", [(37, 4, 2), (37, 5, 3), (64, 8, 4), (64, 1, 2), (20, 7, 1)])
def test_hash_mask_matches_definition(T, chunk, R):
    _, k, _ = make_inputs(2, T, 2, 2, 8, seed=T + chunk)
    rotations = make_rotations(2, 8, R)
    mask = hash_mask(k, rotations, chunk)
    assert mask.dtype == torch.bool and mask.shape == (2, 2, T, T)
    assert torch.equal(mask, hash_by_definition(k, rotations, chunk))
    buckets = hash_buckets_by_definition(k, rotations)
    if R > 1:  # the check means something only when tokens spread over several buckets
        assert all(len(set(buckets[b][h])) > 1 for b in range(2) for h in range(2))


@pytest.mark.parametrize("T,local,stride", [(37, 1, 1), (37, 4, 8), (37, 3, 5), (37, 8, 3), (37, 16, 100), (64, 5, 4)])
def test_fixed_summary_layout_folds_back(T, local, stride):
    """The CUDA layout [keys; summary keys] covers exactly the fixed pattern, each key once."""
    n_summary = T // stride
    mod = attention_module._fixed_summary_mod(local, stride, T)
    layout = mod(None, None, torch.arange(T)[:, None], torch.arange(T + n_summary)[None, :])  # [T, T + S]
    folded = layout[:, :T].long()
    for s in range(n_summary):
        folded[:, s * stride + stride - 1] += layout[:, T + s]
    assert folded.max() <= 1
    assert torch.equal(folded.bool(), fixed_by_definition(T, local, stride))


def test_mask_budgets():
    T = 64
    rows = torch.arange(T)
    for window in (1, 5, 16):
        assert (window_mask(T, window).sum(-1) <= window).all()
    for local, stride in ((1, 1), (4, 8), (5, 3), (16, 7)):
        bound = local + torch.tensor([math.ceil((i + 1) / stride) for i in range(T)])
        assert (fixed_mask(T, local, stride).sum(-1) <= bound).all()
    _, k, _ = make_inputs(2, T, 2, 2, 8)
    for chunk in (1, 4, 5, 16):
        mask = hash_mask(k, make_rotations(2, 8, 3), chunk)
        assert (mask.sum(-1) <= 2 * chunk).all()
        assert mask[..., rows, rows].all()  # every query sees itself


def test_large_budgets_are_full_causal():
    T = 37
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(window_mask(T, T), causal) and torch.equal(window_mask(T, 5 * T), causal)
    assert torch.equal(fixed_mask(T, T, 5), causal) and torch.equal(fixed_mask(T, 2, 1), causal)
    _, k, _ = make_inputs(2, T, 2, 2, 8)
    for chunk in (T, 2 * T):
        assert torch.equal(hash_mask(k, make_rotations(2, 8, 3), chunk), causal.expand(2, 2, T, T))


# ---------------------------------------------------------------------------------------------
# attention functions against the oracle: outputs and gradients in float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hq,Hk", HEADS)
@pytest.mark.parametrize("scale", [None, 0.7])
def test_full_attention(Hq, Hk, scale):
    q, k, v = make_inputs(2, 37, Hq, Hk, 8)
    causal = loop_mask(37, lambda i, j: j <= i)
    check_against_oracle(lambda q, k, v: full_attention(q, k, v, scale=scale), q, k, v, causal, scale)


@pytest.mark.parametrize("Hq,Hk", HEADS)
@pytest.mark.parametrize("window", [1, 6, 37, 100])
def test_window_attention(Hq, Hk, window):
    q, k, v = make_inputs(2, 37, Hq, Hk, 8, seed=window)
    check_against_oracle(lambda q, k, v: window_attention(q, k, v, window), q, k, v,
                         window_by_definition(37, window))


@pytest.mark.parametrize("Hq,Hk", HEADS)
@pytest.mark.parametrize("local,stride", [(1, 1), (4, 8), (3, 5), (1, 6), (16, 100)])
def test_fixed_attention(Hq, Hk, local, stride):
    q, k, v = make_inputs(2, 37, Hq, Hk, 8, seed=local * stride)
    check_against_oracle(lambda q, k, v: fixed_attention(q, k, v, local, stride, scale=0.5), q, k, v,
                         fixed_by_definition(37, local, stride), scale=0.5)


@pytest.mark.parametrize("Hq,Hk", HEADS)
@pytest.mark.parametrize("T,chunk,R", [(37, 4, 2), (37, 5, 3), (64, 8, 2), (37, 1, 2), (37, 37, 2), (20, 64, 3)])
def test_hash_attention(Hq, Hk, T, chunk, R):
    q, k, v = make_inputs(2, T, Hq, Hk, 8, seed=chunk)
    rotations = make_rotations(Hk, 8, R)
    check_against_oracle(lambda q, k, v: hash_attention(q, k, v, rotations, chunk), q, k, v,
                         hash_by_definition(k, rotations, chunk))


def test_hash_attention_no_gradient_to_rotations():
    q, k, v = make_inputs(2, 37, 4, 2, 8)
    rotations = make_rotations(2, 8, 3).requires_grad_()
    k = k.requires_grad_()
    hash_attention(q, k, v, rotations, 4).sum().backward()
    assert rotations.grad is None and k.grad is not None


def test_large_budgets_equal_full_attention():
    q, k, v = make_inputs(2, 37, 4, 2, 8)
    full = full_attention(q, k, v)
    torch.testing.assert_close(window_attention(q, k, v, 37), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(fixed_attention(q, k, v, 37, 9), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(fixed_attention(q, k, v, 1, 1), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(hash_attention(q, k, v, make_rotations(2, 8, 3), 37), full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_dtypes(dtype, atol):
    q, k, v = make_inputs(2, 37, 4, 2, 8, dtype=dtype)
    rotations = make_rotations(2, 8, 2)
    calls = [
        (full_attention, (), loop_mask(37, lambda i, j: j <= i)),
        (window_attention, (6,), window_by_definition(37, 6)),
        (fixed_attention, (4, 8), fixed_by_definition(37, 4, 8)),
        (hash_attention, (rotations, 5), hash_by_definition(k, rotations, 5)),
    ]
    for fn, args, mask in calls:
        out = fn(q, k, v, *args)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), oracle(q, k, v, mask), atol=atol, rtol=0)


def test_empty_sequence():
    q, k, v = make_inputs(2, 0, 4, 2, 8)
    for out in (full_attention(q, k, v), window_attention(q, k, v, 4), fixed_attention(q, k, v, 2, 3),
                hash_attention(q, k, v, make_rotations(2, 8, 2), 4)):
        assert out.shape == q.shape


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _bad_calls():
    q, k, v = make_inputs(2, 16, 4, 2, 8)
    rot = make_rotations(2, 8, 2)
    return {
        "q 3-D": lambda: full_attention(q[0], k, v),
        "k and v differ": lambda: window_attention(q, k, v[:, :, :1], 4),
        "T differs": lambda: full_attention(q, k[:, :8], v[:, :8]),
        "D differs": lambda: full_attention(q, k[..., :4], v[..., :4]),
        "heads not a multiple": lambda: full_attention(q[:, :, :3], k, v),
        "dtype differs": lambda: full_attention(q.float(), k, v),
        "integer dtype": lambda: full_attention(q.long(), k.long(), v.long()),
        "not a tensor": lambda: full_attention(q.tolist(), k, v),
        "device differs": lambda: full_attention(q.to("meta"), k, v),
        "scale negative": lambda: full_attention(q, k, v, scale=-1.0),
        "scale inf": lambda: window_attention(q, k, v, 4, scale=float("inf")),
        "window 0": lambda: window_attention(q, k, v, 0),
        "window float": lambda: window_attention(q, k, v, 4.0),
        "window bool": lambda: window_attention(q, k, v, True),
        "local 0": lambda: fixed_attention(q, k, v, 0, 4),
        "stride 0": lambda: fixed_attention(q, k, v, 4, 0),
        "chunk 0": lambda: hash_attention(q, k, v, rot, 0),
        "rotations heads": lambda: hash_attention(q, k, v, make_rotations(3, 8, 2), 4),
        "rotations dim": lambda: hash_attention(q, k, v, make_rotations(2, 4, 2), 4),
        "rotations 2-D": lambda: hash_attention(q, k, v, rot[0], 4),
        "rotations empty": lambda: hash_attention(q, k, v, rot[..., :0], 4),
        "rotations integer": lambda: hash_attention(q, k, v, rot.long(), 4),
        "rotations device": lambda: hash_attention(q, k, v, rot.to("meta"), 4),
        "window_mask 0": lambda: window_mask(8, 0),
        "fixed_mask stride": lambda: fixed_mask(8, 2, -1),
        "hash_mask chunk": lambda: hash_mask(k, rot, 0),
        "hash_mask k 3-D": lambda: hash_mask(k[0], rot, 4),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise(case):
    with pytest.raises(ValueError):
        _bad_calls()[case]()


# ---------------------------------------------------------------------------------------------
# CUDA: flex_attention path against the CPU float64 result
# ---------------------------------------------------------------------------------------------


def _max_err(x, ref):
    return (x.double().cpu() - ref).abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pattern", ["window", "fixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_path_matches_cpu_float64(pattern, dtype):
    T, D = 1024, 64
    fns = {"window": lambda q, k, v: window_attention(q, k, v, 128),
           "fixed": lambda q, k, v: fixed_attention(q, k, v, 64, 64)}
    fn = fns[pattern]
    q, k, v = make_inputs(2, T, 4, 2, D, seed=7)
    cot = torch.randn(2, T, 4, D, dtype=torch.float64)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)

    leaves = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    assert out.dtype == dtype and out.is_cuda
    grads = torch.autograd.grad(out, leaves, cot.to("cuda", dtype))
    # bf16: inputs alone are rounded to ~4e-3 relative; fp32 runs at fp32 (TF32 off by default)
    out_tol, grad_tol = (2e-2, 6e-2) if dtype == torch.bfloat16 else (1e-4, 1e-3)
    assert _max_err(out, ref.detach()) < out_tol
    for name, g, rg in zip("qkv", grads, ref_grads):
        err = _max_err(g, rg) / rg.abs().max().item()
        assert err < grad_tol, f"grad {name}: relative max error {err:.2e}"
    # the block mask was cached: a second call reuses it
    n_masks = len(attention_module._BLOCK_MASKS)
    fn(*leaves)
    assert len(attention_module._BLOCK_MASKS) == n_masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("T", [77, 1000])
def test_flex_path_ragged_lengths(T):
    """T below one 128-block and T not a multiple of it, float32, forward and gradients."""
    q, k, v = make_inputs(1, T, 4, 2, 32, seed=T)
    cot = torch.randn(1, T, 4, 32, dtype=torch.float64)
    for fn in (lambda q, k, v: window_attention(q, k, v, 50), lambda q, k, v: fixed_attention(q, k, v, 16, 24)):
        ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = fn(*ref_leaves)
        ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
        leaves = [x.to("cuda", torch.float32).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, cot.to("cuda", torch.float32))
        assert _max_err(out, ref.detach()) < 1e-4
        for g, rg in zip(grads, ref_grads):
            assert _max_err(g, rg) < 1e-3
