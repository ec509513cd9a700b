"""The Triton selection (thresholds, key ranges, block lists) against the PyTorch selection.

The PyTorch selection is itself checked against brute force in test_select.py. On CPU these kernels run
under TRITON_INTERPRET=1 (slow, so few small cases); on a GPU they run compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from sparsek.ops.select import kernels as select_kernels  # noqa: E402
from sparsek.ops.select.blocks import block_key_lists  # noqa: E402
from sparsek.ops.select.fused import (  # noqa: E402
    block_key_lists_triton,
    select_rows_triton,
    threshold_backward_triton,
)
from sparsek.ops.select.prefix import select_rows, threshold_backward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("selection kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("t_len,topk,window,kind", [
    (1, 1, 0, "randn"), (37, 5, 3, "randn"), (50, 7, 0, "ties"), (41, 3, 6, "gaps"), (20, 30, 2, "randn"),
    (33, 4, 40, "randn"), (29, 0, 3, "randn"), (64, 1, 1, "ties"), (30, 2, 1, "outliers"), (40, 3, 2, "offset"),
])
def test_triton_selection_matches_pytorch(t_len, topk, window, kind):
    """"outliers": +-1e30 and -3e38 among scores near 0, which must not swamp the sums of the thresholds;
    "offset": float64 scores near 1e12, whose differences a sum of raw scores would lose."""
    torch.manual_seed(t_len * 31 + topk)
    if kind == "outliers":
        u = torch.randn(3, t_len, device=DEVICE)
        u[:, [1, 4, 6]] = torch.tensor([1e30, -3e38, -1e30], device=DEVICE)
    elif kind == "offset":
        u = 1e12 + torch.randn(3, t_len, dtype=torch.float64, device=DEVICE)
    elif kind == "ties":
        u = torch.randint(0, 4, (3, t_len), device=DEVICE).float()
    elif kind == "gaps":  # spread > 1 apart: flat thresholds everywhere
        u = torch.randn(3, t_len, device=DEVICE) * 10
    else:
        u = torch.randn(3, t_len, device=DEVICE) * 2
    tau, start, end = select_rows_triton(u, topk, window)
    tau_ref, start_ref, end_ref = select_rows(u, topk, window)
    assert torch.equal(start, start_ref) and torch.equal(end, end_ref)
    assert torch.equal(torch.isinf(tau), torch.isinf(tau_ref))
    finite = torch.isfinite(tau_ref)
    torch.testing.assert_close(tau[finite], tau_ref[finite], atol=1e-9, rtol=1e-9)
    for block in (1, 4, 16):
        lists = block_key_lists_triton(start, end, topk, block)
        assert torch.equal(lists, block_key_lists(start_ref, end_ref, topk, block))


def test_running_max_kernel_carries_across_chunks():
    """The running maximum of the thresholds (exact prefix thresholds rarely decrease, so the selection tests
    above hardly reach the carry between chunks): against torch.cummax on random rows, into a strided output."""
    torch.manual_seed(0)
    rows, n, chunk = 3, 50, 16
    x = torch.randn(rows, n, dtype=torch.float64, device=DEVICE)
    x[1, 20:] = -torch.inf                                   # -inf after a finite prefix
    n_chunks = triton.cdiv(n, chunk)
    padded = torch.nn.functional.pad(x, (0, n_chunks * chunk - n), value=-torch.inf)
    chunk_max = padded.view(rows, n_chunks, chunk).amax(2).contiguous()
    out = torch.full((rows, n + 5), torch.nan, dtype=torch.float64, device=DEVICE)
    select_kernels.running_max_kernel[(rows, n_chunks)](x, chunk_max, out[:, 5:], n, n_chunks, n + 5, CHUNK=chunk,
                                                        CHUNKS_POW2=triton.next_power_of_2(n_chunks))
    assert torch.equal(out[:, 5:], torch.cummax(x, dim=1).values)
    assert torch.isnan(out[:, :5]).all()


@pytest.mark.parametrize("t_len,window,group,kind", [
    (50, 3, 1, "selection"), (48, 0, 3, "selection"), (40, 2, 2, "ties"), (33, 0, 1, "ties"), (9, 20, 1, "ties"),
    (1, 0, 1, "selection"), (45, 1, 2, "rounding"),
])
def test_threshold_backward_matches_pytorch(t_len, window, group, kind):
    """The Triton threshold gradient (summed over a row's query heads, added to du) against
    prefix.threshold_backward, over several scan chunks (8 queries under the interpreter). "ties": scores on a
    grid of halves and thresholds drawn from the scores and the scores minus 1, so that tau_i == u_l and
    tau_i == u_l - 1 occur and the strict / non-strict comparisons matter; "rounding": thresholds at u_l - 1
    rounded to float32, which only a float64 comparison (as in prefix.py) puts on the right side of u_l - 1."""
    torch.manual_seed(t_len + window)
    rows = 3
    if kind == "selection":
        u = torch.randn(rows, t_len, device=DEVICE)
        tau = select_rows(u, 4, window)[0].float()
    elif kind == "rounding":  # thresholds at float32(u - 1), which rounds u - 1 for about half of these u
        u = torch.rand(rows, t_len, device=DEVICE) / 2
        pool = torch.cat([(u.double() - 1).float(), u], dim=1)
        tau = pool.gather(1, torch.randint(0, 2 * t_len, (rows, t_len), device=DEVICE)).sort(dim=1).values
        tau[:, : t_len // 4] = -torch.inf
    else:
        u = torch.randint(-4, 5, (rows, t_len), device=DEVICE).float() / 2
        pool = torch.cat([u, u - 1], dim=1)
        tau = pool.gather(1, torch.randint(0, 2 * t_len, (rows, t_len), device=DEVICE)).sort(dim=1).values
        tau[:, : t_len // 4] = -torch.inf
    grad_tau = torch.randn(rows * group, t_len, device=DEVICE)
    du = torch.randn(rows, t_len, device=DEVICE)
    grad_sum = grad_tau.double().view(rows, group, t_len).sum(1)
    expected = du + threshold_backward(u.double(), tau.double(), window, grad_sum).float()
    out = threshold_backward_triton(u, tau, window, grad_tau, du.clone())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if window < t_len - 1:                               # else no key is ever a candidate
        assert expected.ne(du).any()                     # some key gets a gradient through the thresholds


@pytest.mark.parametrize("rows,weighted,n,nbits", [(3, 2, 100, 8), (6, 4, 37, 7), (2, 1, 8, 4), (3, 2, 1, 1)])
def test_wavelet_levels_match_pytorch(rows, weighted, n, nbits):
    # Many short segments per row (16 entries under the interpreter), so that the counts each level's launch
    # passes to the next cross segment boundaries; rows past `weighted` carry no weights.
    from sparsek.ops.select.fused import _wavelet_levels
    from sparsek.ops.select.wavelet import wavelet_levels

    torch.manual_seed(n)
    vals = torch.randint(0, 1 << nbits, (rows, n), device=DEVICE, dtype=torch.int32)
    weights = torch.randn(weighted, n, device=DEVICE, dtype=torch.float64)
    zeros_before, ones_weight_before = _wavelet_levels(vals.clone(), weights.clone(), nbits)
    all_weights = torch.cat([weights, torch.zeros(rows - weighted, n, device=DEVICE, dtype=torch.float64)])
    for level, ref in enumerate(wavelet_levels(vals.long(), nbits, all_weights)):
        assert torch.equal(zeros_before[level].long(), ref.zeros_before)
        torch.testing.assert_close(ones_weight_before[level], ref.ones_weight_before[:weighted], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["randn", "ties", "shifted ties"])
def test_rank_sequences_equal_a_stable_sort(kind, dtype):
    # One sort and a merge give exactly the stable sort of [u, u - 1] that prefix.py uses, and its best-first order;
    # the sort runs in the scores' dtype, the rest in float64, relative to the row's median as in prefix.py.
    from sparsek.ops.select.fused import _rank_sequences
    from sparsek.ops.select.prefix import _best_first

    torch.manual_seed(1)
    if kind == "randn":
        scores = torch.randn(3, 300, dtype=torch.float64, device=DEVICE).to(dtype)
    elif kind == "ties":
        scores = torch.randint(0, 5, (3, 300), device=DEVICE).to(dtype)     # u_l - 1 equals other scores
    else:
        scores = (torch.randint(0, 5, (3, 300), device=DEVICE) * 0.5 + 0.25).to(dtype)
    u_abs = scores.double()
    by_rank, breaks, vals, weights, shift = _rank_sequences(scores, u_abs)
    by_rank_ref, rank_best_ref = _best_first(u_abs)
    assert torch.equal(shift, u_abs.median(dim=1, keepdim=True).values)
    u = u_abs - shift
    unsorted = torch.cat([u, u - 1], dim=1)
    order = torch.argsort(unsorted, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(600, device=DEVICE).expand_as(order))
    assert torch.equal(by_rank, by_rank_ref)
    assert torch.equal(breaks, unsorted.gather(1, order))
    assert torch.equal(vals.long(), torch.cat([rank[:, :300], rank[:, 300:], rank_best_ref]))
    assert torch.equal(weights, torch.cat([u, u]))


@pytest.mark.parametrize("kind", ["increasing", "randn"])
def test_slots_by_pointer_jumping(kind):
    # Increasing scores: every new key evicts the oldest, so slot chains are T / topk links long, more than
    # one launch of the Triton pointer jumping follows.
    from sparsek.ops.select.blocks import selection_slots
    from sparsek.ops.select.fused import _selection_slots

    torch.manual_seed(2)
    u = torch.arange(300, device=DEVICE).float().expand(2, 300) if kind == "increasing" else \
        torch.randn(2, 300, device=DEVICE)
    _, start, end = select_rows(u, 2, 3)
    assert torch.equal(_selection_slots(start.int(), end.int(), 2).long(), selection_slots(start, end, 2))


@pytest.mark.parametrize("t_len,topk,window", [(37, 5, 3), (24, 4, 0), (16, 0, 2), (20, 30, 2)])
def test_prefix_selection_backends_share_one_signature(t_len, topk, window):
    """prefix_selection(backend="triton") gives the reference's ranges, its tau and its gradient."""
    from sparsek.ops.select import prefix_selection

    torch.manual_seed(t_len + topk)
    scores = (torch.randn(2, t_len, 3, device=DEVICE) * 2).requires_grad_(True)
    upstream = torch.randn(2, t_len, 3, device=DEVICE)
    results = []
    for backend in ("reference", "triton"):
        selection = prefix_selection(scores, topk, window, backend=backend)
        finite = torch.isfinite(selection.tau)
        grad = torch.zeros_like(scores)
        if selection.tau.requires_grad and finite.any():
            (grad,) = torch.autograd.grad((selection.tau[finite] * upstream[finite]).sum(), scores)
        results.append((selection, grad))
    (ref, ref_grad), (got, got_grad) = results
    assert torch.equal(got.start, ref.start) and torch.equal(got.end, ref.end)
    assert got.tau.dtype == ref.tau.dtype == torch.float32
    torch.testing.assert_close(got.tau, ref.tau, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-5)
    if topk and t_len > topk + window:
        assert ref_grad.ne(0).any()                      # the thresholds pass gradient to the scores
    with pytest.raises(ValueError, match="float32"):
        prefix_selection(scores.detach().double(), topk, window, backend="triton")
    if topk:                                             # large offsets: float32 thresholds would round off
        with pytest.raises(ValueError, match="below"):
            prefix_selection(scores.detach() + 1e5, topk, window, backend="triton")


@pytest.mark.parametrize("shape", [(0, 8, 2), (2, 8, 0)])
def test_prefix_selection_triton_backend_takes_empty_batches(shape):
    from sparsek.ops.select import prefix_selection

    selection = prefix_selection(torch.randn(*shape, device=DEVICE), 2, 1, backend="triton")
    assert selection.tau.shape == shape and selection.start.shape == shape
