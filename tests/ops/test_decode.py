"""Decode attention over a SparseK cache: the reference against an explicit float64 loop, the Triton kernel
against the reference (under TRITON_INTERPRET=1 on CPU, natively on a GPU), input validation, and bf16 at real
sizes on a GPU. (tests/ops/test_kernels_compile.py compiles the kernels for sm_90 without a GPU.)
"""

from __future__ import annotations

import os

import pytest
import torch

from sparsek.ops.common import tiles
from sparsek.ops.decode import decode_attention, decode_attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                   reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def make_cache(batch, n_kv_heads, group, n_entries, head_dim, dtype=torch.float32, device="cpu", window=None):
    """q [B, Hq, D], keys, values [B, H, N, D] and a cache-like mask: the first `window` entries weigh 1, the
    slots clip(x, 0, 1) with exact 0s and 1s among them; some slots empty, and row (0, 0) entirely empty."""
    window = n_entries // 3 if window is None else window
    q = torch.randn(batch, n_kv_heads * group, head_dim, device=device).to(dtype)
    keys = torch.randn(batch, n_kv_heads, n_entries, head_dim, device=device).to(dtype)
    values = torch.randn(batch, n_kv_heads, n_entries, head_dim, device=device).to(dtype)
    weight = (1.5 * torch.rand(batch, n_kv_heads, n_entries, device=device) - 0.25).clamp(0, 1)
    weight[..., :window] = 1.0
    attended = torch.rand(batch, n_kv_heads, n_entries, device=device) > 0.2
    attended[..., :window] = True
    attended[0, 0] = False
    return q, keys, values, weight, attended


def loop_decode(q, keys, values, weight, attended, gate, scale=None):
    """Independent float64 oracle: one explicit softmax per (batch row, query head)."""
    q, keys, values, weight = (x.double() for x in (q, keys, values, weight))
    batch, n_q_heads, head_dim = q.shape
    group = n_q_heads // keys.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, n_q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for hq in range(n_q_heads):
            h = hq // group
            idx = attended[b, h].nonzero().flatten()
            if len(idx) == 0:
                continue
            m = weight[b, h, idx]
            logits = scale * (keys[b, h, idx] @ q[b, hq])
            if gate == "kv":
                logits = logits * m
            e = torch.exp(logits - logits.max())
            p = e / e.sum()
            if gate != "none":
                p = p * m
            out[b, hq] = p @ values[b, h, idx]
    return out


# --- reference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["kv", "v", "none"])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_loop(gate, group, dtype):
    inputs = make_cache(2, 2, group, 23, 8, dtype)
    want = loop_decode(*inputs, gate)
    got = decode_attention(*inputs, gate=gate, backend="reference")
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert (got[0, :group] == 0).all()                    # query heads of the empty KV head (0, 0)


def test_reference_scale_half_inputs_and_empty_cache():
    q, keys, values, weight, attended = make_cache(1, 2, 2, 10, 8, torch.bfloat16)
    want = loop_decode(q, keys, values, weight, attended, "kv", scale=0.3)
    got = decode_attention_reference(q, keys, values, weight, attended, "kv", 0.3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)   # float32 math, bf16 output
    empty = decode_attention(q, keys[:, :, :0], values[:, :, :0], weight[:, :, :0], attended[:, :, :0])
    assert empty.shape == q.shape and (empty == 0).all()


# --- Triton kernel -------------------------------------------------------------------------------------------


@pytest.fixture
def fused(monkeypatch):
    """The host module, with every kernel output (partials included) starting as NaN."""
    from sparsek.ops.decode import fused

    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)
    return fused


@needs_kernels
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("gate", ["kv", "v", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,n_kv_heads,group,n_entries,head_dim",
                         [(2, 2, 3, 37, 16), (1, 3, 1, 50, 64), (2, 1, 4, 21, 256)])   # 256: Gemma 3's head dim
def test_triton_matches_reference(fused, batch, n_kv_heads, group, n_entries, head_dim, dtype, gate, splits):
    inputs = make_cache(batch, n_kv_heads, group, n_entries, head_dim, dtype, DEVICE)
    got = fused.decode_attention_triton(*inputs, gate, splits=splits)
    want = decode_attention_reference(*(x.double() if x.is_floating_point() else x for x in inputs), gate)
    assert got.dtype == dtype and not torch.isnan(got).any()
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert (got[0, :group] == 0).all()


@needs_kernels
def test_triton_strided_query_float64_weight_and_nothing_attended(fused):
    q, keys, values, weight, attended = make_cache(2, 2, 2, 33, 32, device=DEVICE)
    q_seq = torch.randn(2, 5, 4, 32, device=DEVICE)            # q[:, t] of a [B, T, Hq, D] tensor: strided
    want = decode_attention_reference(q_seq[:, 2].double(), keys.double(), values.double(), weight.double(),
                                      attended, scale=0.2)
    got = decode_attention(q_seq[:, 2], keys, values, weight.double(), attended, scale=0.2, backend="triton")
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    nothing = decode_attention(q, keys, values, weight, torch.zeros_like(attended), backend="triton")
    assert (nothing == 0).all()


@needs_kernels
def test_auto_split_count_covers_the_entries(fused):
    """The automatic split count (several programs per row under the interpreter) against splits=1."""
    n_entries = 130 if DEVICE == "cpu" else 1000                  # a GPU split is at least MIN_SPLIT_LEN long
    inputs = make_cache(1, 1, 4, n_entries, 16, device=DEVICE)
    block_n = tiles.decode(tiles.target(torch.device(DEVICE)), 16)["attend"]["BLOCK_N"]
    assert fused.num_splits(1, n_entries, block_n, torch.device(DEVICE)) > 1
    got = fused.decode_attention_triton(*inputs)
    torch.testing.assert_close(got, fused.decode_attention_triton(*inputs, splits=1), atol=1e-6, rtol=1e-6)


# --- validation ----------------------------------------------------------------------------------------------


def _bad_inputs():
    q, k, v, w, a = make_cache(1, 2, 2, 8, 16)
    return [
        ((q[0], k, v, w, a), {}, "q must be"),
        ((q, k, v[:, :, :4], w, a), {}, "same shape"),
        ((q[:, :, :8], k, v, w, a), {}, "to match q"),
        ((q[:, :3], k, v, w, a), {}, "multiple of KV heads"),
        ((q, k, v, w[:, :, :4], a), {}, "weight must be"),
        ((q, k, v, w, a[:, :1]), {}, "attended must be"),
        ((q.half(), k, v, w, a), {}, "one floating dtype"),
        ((q.long(), k.long(), v.long(), w, a), {}, "one floating dtype"),
        ((q, k, v, w.half(), a), {}, "weight must be float32"),
        ((q, k, v, w, a.float()), {}, "attended must be bool"),
        ((q, k, v, w.to("meta"), a), {}, "one device"),
        ((q, k, v, w, a), {"gate": "soft"}, "gate must be"),
        ((q, k, v, w, a), {"scale": 0.0}, "scale must be"),
        ((q, k, v, w, a), {"backend": "cuda"}, "backend must be"),
        ((q.double(), k.double(), v.double(), w, a), {"backend": "triton"}, "backend='triton' needs"),
        ((q[..., :12], k[..., :12], v[..., :12], w, a), {"backend": "triton"}, "backend='triton' needs"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_validation_errors(index):
    args, kwargs, message = _bad_inputs()[index]
    with pytest.raises(ValueError, match=message):
        decode_attention(*args, **kwargs)


def test_auto_falls_back_to_the_reference():
    """float64 and head dims the kernel lacks still decode (auto picks the reference)."""
    inputs = make_cache(1, 2, 2, 8, 12, torch.float64)
    torch.testing.assert_close(decode_attention(*inputs), loop_decode(*inputs, "kv"), atol=1e-12, rtol=1e-12)


# --- GPU: bf16 at decode sizes -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (TRITON_INTERPRET unset)")
@pytest.mark.parametrize("gate", ["kv", "none"])
@pytest.mark.parametrize("batch,n_kv_heads,group,n_entries,head_dim",
                         [(16, 3, 3, 1536, 64), (1, 8, 4, 4096, 128), (2, 1, 4, 1024, 256)])   # row (0, 0) is empty
def test_bf16_error_within_twice_pytorch_bf16(fused, batch, n_kv_heads, group, n_entries, head_dim, gate):
    """Criterion of flash-attention's tests: against float64, the kernel's error stays within 2x the error of
    the same math in PyTorch bf16 (plus a small floor), with the automatic split count and with one split."""
    inputs = make_cache(batch, n_kv_heads, group, n_entries, head_dim, torch.bfloat16, "cuda", window=512)
    exact = decode_attention_reference(*(x.double() if x.is_floating_point() else x for x in inputs), gate)
    plain = decode_attention_reference(*inputs, gate, upcast=False)
    err_plain = (plain.double() - exact).abs().max().item()
    for splits in (None, 1):
        got = fused.decode_attention_triton(*inputs, gate, splits=splits)
        assert not torch.isnan(got).any()
        err = (got.double() - exact).abs().max().item()
        print(f"B={batch} H={n_kv_heads} G={group} N={n_entries} splits={splits}: kernel {err:.3e}  "
              f"pytorch-bf16 {err_plain:.3e}")
        assert err <= 2 * err_plain + 1e-4, f"kernel error {err} > 2 x PyTorch bf16 error {err_plain}"
