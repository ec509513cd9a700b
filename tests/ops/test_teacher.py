"""The teacher mass of scorer distillation against a dense float64 computation from its definition."""

from __future__ import annotations

import os

import pytest
import torch

from sparsek.ops.teacher import teacher_mass

# The kernels run compiled on a GPU, interpreted on CPU tensors otherwise (conftest sets TRITON_INTERPRET).
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def dense_mass(q, k, window, reduction, scale):
    """The whole T x T float64 attention matrix, then the column reduction over queries i >= j + window."""
    b, t, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    q64 = q.double().view(b, t, hk, g, d)
    logits = torch.einsum("bihgd,bjhd->bhgij", q64, k.double()) * scale
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    probs = torch.softmax(logits.masked_fill(j > i, -torch.inf), dim=-1)         # [B, Hk, G, T, T]
    outside = (i >= j + window).double()
    probs = probs * outside
    if reduction == "max":
        out = probs.amax(dim=(2, 3))
    else:
        out = probs.sum(dim=(2, 3))
        if reduction == "mean":
            out = out / (outside.sum(0) * g).clamp(min=1)
    return out.permute(0, 2, 1)                                                  # [B, T, Hk]


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
@pytest.mark.parametrize("heads,window,t_len", [((2, 2), 0, 37), ((4, 2), 5, 50), ((4, 1), 9, 33), ((2, 1), 60, 20)])
def test_reference_equals_dense(reduction, heads, window, t_len):
    hq, hk = heads
    q, k = torch.randn(2, t_len, hq, 16, dtype=torch.float64), torch.randn(2, t_len, hk, 16, dtype=torch.float64)
    expected = dense_mass(q, k, window, reduction, 0.3)
    got = teacher_mass(q, k, window=window, reduction=reduction, scale=0.3, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert (got[:, t_len - window:] == 0).all() if window else True


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
@pytest.mark.parametrize("heads,window,t_len", [((2, 2), 0, 45), ((4, 2), 7, 70), ((4, 1), 20, 64)])
def test_triton_equals_dense(reduction, heads, window, t_len):
    """The kernels in float32 against float64; odd lengths leave partial tiles."""
    hq, hk = heads
    q, k = torch.randn(1, t_len, hq, 16), torch.randn(1, t_len, hk, 16)
    expected = dense_mass(q, k, window, reduction, 16 ** -0.5).float()
    got = teacher_mass(q.to(DEVICE), k.to(DEVICE), window=window, reduction=reduction, backend="triton").cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_fp16_triton_close_to_float64():
    q, k = torch.randn(1, 40, 2, 32).half(), torch.randn(1, 40, 1, 32).half()
    expected = dense_mass(q, k, 4, "sum", 32 ** -0.5).float()
    got = teacher_mass(q.to(DEVICE), k.to(DEVICE), window=4, reduction="sum", backend="triton").cpu()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_sum_of_all_mass_is_the_number_of_rows_outside_windows():
    """With window 0 each query's row sums to 1, so the column sums add up to T * Hq per batch row."""
    q, k = torch.randn(1, 30, 4, 8, dtype=torch.float64), torch.randn(1, 30, 2, 8, dtype=torch.float64)
    total = teacher_mass(q, k, window=0, reduction="sum", backend="reference").sum()
    assert total.item() == pytest.approx(30 * 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=-1), "window"), (dict(window=2, reduction="median"), "reduction"),
    (dict(window=2, backend="cuda"), "backend"), (dict(window=2, backend="gather"), "backend"),
])
def test_bad_arguments(kwargs, match):
    q, k = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match=match):
        teacher_mass(q, k, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        teacher_mass(torch.randn(1, 8, 3, 8), torch.randn(1, 8, 2, 8), window=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("t_len,hq,hk,d", [(8192, 4, 1, 256), (4099, 8, 2, 128)])
def test_gpu_bf16_close_to_float32_reference(t_len, hq, hk, d):
    q = torch.randn(1, t_len, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t_len, hk, d, device="cuda", dtype=torch.bfloat16)
    for reduction in ("sum", "mean", "max"):
        expected = teacher_mass(q.float(), k.float(), window=512, reduction=reduction, backend="reference")
        got = teacher_mass(q, k, window=512, reduction=reduction, backend="triton")
        err = (got - expected).abs().max().item()
        assert err <= 2e-2 * expected.abs().max().item(), (reduction, err)
