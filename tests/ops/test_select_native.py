"""ops/select/native.c, the CPU twin of the prefix selection, against the rule's statement: `prefix_selection`
with backend="reference" (the brute-force checks of test_select.py and test_numerics.py run on both)."""

from __future__ import annotations

import pytest
import torch

from sparsek.ops import prefix_selection
from sparsek.ops.select import native
from sparsek.ops.select.blocks import block_key_lists


def scores(pattern: str, t_len: int, seed: int) -> torch.Tensor:
    """[2, T, 3] float64: 'normal'; 'bunched' (all within 0.5: every key stays fractional, the live set grows
    with the row); 'ties' (small integers); 'recency' (a rising trend: every new key enters the top-k)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "normal":
        return torch.randn(2, t_len, 3, generator=g, dtype=torch.float64)
    if pattern == "bunched":
        return 0.5 * torch.rand(2, t_len, 3, generator=g, dtype=torch.float64)
    if pattern == "ties":
        return torch.randint(-2, 3, (2, t_len, 3), generator=g).double()
    return 0.01 * torch.arange(t_len, dtype=torch.float64)[:, None] + torch.randn(2, t_len, 3, generator=g,
                                                                                   dtype=torch.float64)


@pytest.mark.parametrize("pattern", ["normal", "bunched", "ties", "recency"])
@pytest.mark.parametrize("topk,window", [(1, 0), (16, 16), (64, 5), (600, 3)])
def test_native_equals_reference_with_gradient(pattern, topk, window):
    """Long rows (1500 keys): the same ranges and block lists exactly, tau and its gradient to float64
    rounding."""
    u = scores(pattern, 1500, seed=topk + window)
    results = {}
    for backend in ("reference", "native"):
        x = u.clone().requires_grad_()
        sel = prefix_selection(x, topk, window, backend=backend)
        grad_tau = torch.randn(sel.tau.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        sel.tau.backward(torch.where(torch.isinf(sel.tau), 0, grad_tau))
        results[backend] = sel, x.grad
    (ref, ref_grad), (got, got_grad) = results["reference"], results["native"]
    assert torch.equal(got.start, ref.start) and torch.equal(got.end, ref.end)
    assert torch.equal(torch.isneginf(got.tau), torch.isneginf(ref.tau))
    finite = torch.isfinite(ref.tau)
    torch.testing.assert_close(got.tau[finite], ref.tau[finite], rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=1e-12)
    start, end = (x.permute(0, 2, 1).reshape(6, -1) for x in (ref.start, ref.end))
    for block in (1, 16):
        assert torch.equal(block_key_lists(start, end, topk, block, backend="auto"),
                           block_key_lists(start, end, topk, block))


def test_native_float32_scores_give_float32_tau():
    u = torch.randn(1, 300, 2)
    ref, got = (prefix_selection(u, 8, 4, backend=b) for b in ("reference", "native"))
    assert got.tau.dtype == torch.float32
    torch.testing.assert_close(got.tau, ref.tau, rtol=0, atol=1e-6)
    assert torch.equal(got.end, ref.end)


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler and an empty build cache: native.c cannot be built."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def test_without_a_compiler_native_says_why_and_auto_keeps_the_reference(no_compiler):
    u = torch.randn(1, 50, 2, dtype=torch.float64)
    assert not native.available()
    with pytest.raises(ValueError, match="backend='native' cannot run: .*no-such-compiler"):
        prefix_selection(u, 4, 2, backend="native")
    auto, ref = prefix_selection(u, 4, 2, backend="auto"), prefix_selection(u, 4, 2, backend="reference")
    assert torch.equal(auto.tau, ref.tau) and torch.equal(auto.end, ref.end)


def test_the_build_is_cached(monkeypatch, tmp_path):
    """The first use builds one library into $SPARSEK_CACHE; a new process (a cleared cache) loads it again."""
    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available()
        built = list(tmp_path.glob("*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native._library.cache_clear()
        assert native.available() and built[0].stat().st_mtime_ns == stamp
    finally:
        native._library.cache_clear()


FAR = 1.3139436595456604e16
FAR_ROWS = [  # (scores, topk, window): keys far from the rest, beyond what float64 sums resolve
    ([2.0 ** 60 + 768] * 3 + [0.0] * 4, 2, 4),
    ([1e308, 1e308, -1e308, -1e308, -1e308], 1, 0),
    ([1e16, 1e16, 0.0, 1.0], 1, 0),
    ([1e16 + 2] * 3 + [1.5, 0.7], 4, 0),
    ([1e308, 1e308, 0.0, 0.0, 0.0], 1, 0),
    ([0.3, 0.2, 0.1] + [-1e17] * 10, 2, 0),
    ([0.45, -0.63, -1.24, FAR, 0.76, -1.58, -0.26, 0.23, 1.56, 0.38, FAR, FAR], 4, 0),
    ([1e30, 1e30, 0.0, 0.5, 0.25], 3, 0),    # 1e30 - 1 rounds to 1e30: the reference's sort once put it above
    ([1e30, 1e30, 0.0, 0.5, 9.0], 3, 0),
    ([0.0, -3e6, 0.0, -3e6, 0.0], 3, 0),     # tau far below the median: the reference once returned -1.0
]


@pytest.mark.parametrize("row,topk,window", FAR_ROWS)
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_far_keys_raise_or_give_masks_that_sum_to_topk(row, topk, window, backend):
    """Keys 1e16 to 1e308 away (these crashed or mis-summed native.c before its sums were clamped as the
    reference's, and 1e30 broke the reference's breakpoint order): a ValueError, or thresholds whose soft masks
    sum to topk for every query."""
    u = torch.tensor(row, dtype=torch.float64)
    try:
        tau = prefix_selection(u.view(1, -1, 1), topk, window, backend=backend).tau[0, :, 0]
    except ValueError as error:
        assert "scores" in str(error)
        return
    for i in range(window + topk, len(row)):
        mask_sum = (u[: i - window + 1] - tau[i]).clamp(0, 1).sum()
        torch.testing.assert_close(mask_sum, torch.tensor(float(topk), dtype=torch.float64), atol=1e-6, rtol=0)


def test_bunched_rows_take_the_reference_thresholds(monkeypatch):
    """Past its work budget (scores bunched within 1: the sweep would cost O(T^2)) the native pass keeps its
    ranges and leaves the thresholds to the reference: the same selection either way."""
    u = scores("bunched", 400, seed=3)
    want = prefix_selection(u, 8, 4, backend="reference")
    monkeypatch.setattr(native, "_WORK_PER_PREFIX", -10 ** 6)                 # any work is over budget
    got = prefix_selection(u, 8, 4, backend="native")
    assert torch.equal(got.tau, want.tau) and torch.equal(got.end, want.end)


def test_gathered_attention_under_torch_compile():
    """The C calls take raw pointers: compiled code must run them eagerly (they are marked for Dynamo to skip),
    and give eager's output."""
    from sparsek.ops.attention import sparsek_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g) for _ in range(3))
    u = torch.randn(1, 48, 2, generator=g)
    eager = sparsek_attention(q, k, v, u, topk=4, window=4, backend="gather")
    compiled = torch.compile(lambda *x: sparsek_attention(*x, topk=4, window=4, backend="gather"), backend="eager")
    torch.testing.assert_close(compiled(q, k, v, u), eager, atol=0, rtol=0)


def test_native_block_lists_refuse_ranges_no_selection_gives():
    start = torch.zeros(1, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        block_key_lists(start.int(), start.int(), 2, 4, backend="auto")
    with pytest.raises(ValueError, match="start <= end <= T"):
        block_key_lists(start, torch.full((1, 8), 9), 2, 4, backend="auto")
    with pytest.raises(ValueError, match="backend"):
        block_key_lists(start, start, 2, 4, backend="native")


def test_a_corrupt_cached_library_falls_back(monkeypatch, tmp_path):
    """A library in the cache that does not load (corrupt, another machine's): auto keeps the reference. (One flag
    set: with several, the next one's build would load instead.)"""
    monkeypatch.setattr(native, "_FLAG_SETS", native._FLAG_SETS[:1])
    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path / "good"))
    native._library.cache_clear()
    try:
        assert native.available()
        built, = (tmp_path / "good").glob("*.so")
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / built.name).write_bytes(b"not a library")    # the name this build would load
        monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path / "bad"))
        native._library.cache_clear()
        assert not native.available() and "could not build or load" in native.unavailable_reason()
        u = torch.randn(1, 30, 2, dtype=torch.float64)
        assert torch.equal(prefix_selection(u, 3, 2, backend="auto").tau, prefix_selection(u, 3, 2).tau)
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("pattern", ["normal", "ties"])
def test_native_threshold_backward_equals_the_pytorch_one(pattern):
    """The C twin of `prefix.threshold_backward` on the thresholds of real rows (non-decreasing, -inf before
    the first candidates), windows 0 to beyond T."""
    from sparsek.ops.select.prefix import threshold_backward

    u = scores(pattern, 300, seed=4).permute(0, 2, 1).reshape(6, 300)
    grad_tau = torch.randn(6, 300, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for topk, window in ((1, 0), (8, 3), (40, 299), (5, 400)):
        tau = prefix_selection(u.T[None], topk, window).tau[0].T.contiguous()
        grad = torch.where(torch.isinf(tau), 0, grad_tau)
        torch.testing.assert_close(native.threshold_backward_native(u, tau, window, grad),
                                   threshold_backward(u, tau, window, grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", ["normal", "bunched"])
def test_rows_split_between_threads(monkeypatch, pattern):
    """Rows swept on several OpenMP threads, each with its own scratch, give the one-thread selection; a row that
    passes its work budget (bunched rows) sends all rows to the reference's thresholds, as one thread does."""
    u = scores(pattern, 400, seed=6).permute(0, 2, 1).reshape(6, 400).contiguous()
    if pattern == "bunched":
        monkeypatch.setattr(native, "_WORK_PER_PREFIX", 0)      # bunched rows need more than 2 * topk steps
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = native.select_rows_native(u, 8, 4)
    assert one[3] == (native.TOO_MUCH_WORK if pattern == "bunched" else 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(native, "_SWEEP_PER_THREAD", 1)
    split = native.select_rows_native(u, 8, 4)
    assert split[3] == one[3]
    for a, b in zip(split[1:3], one[1:3]):                       # the ranges
        assert torch.equal(a, b)
    if pattern == "normal":                                     # complete thresholds
        assert torch.equal(split[0], one[0])


@pytest.mark.parametrize("t_len", [1, 2, 7, 128, 301])
def test_row_medians_are_torch_medians(t_len):
    """native.c's quickselect over each row's first n entries (its candidates, as prefix._prefix_thresholds
    centres them): the lower middle value for an even n, as torch.median, ties included; 0 for n = 0."""
    library = native._library()
    for u in (torch.randn(3, t_len, dtype=torch.float64), torch.randint(0, 3, (3, t_len)).double()):
        for n in {t_len, t_len // 2, 1, 0}:
            median = torch.empty(3, dtype=torch.float64)
            assert library.sparsek_row_medians(u.data_ptr(), 3, t_len, n, median.data_ptr()) == 0
            want = u[:, :n].median(dim=1).values if n else torch.zeros(3, dtype=torch.float64)
            assert torch.equal(median, want), n
