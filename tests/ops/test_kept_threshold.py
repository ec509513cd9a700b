"""The decode cache's threshold kernel (`kept_threshold`) against the reference `threshold_last` and an
independent float64 bisection, under TRITON_INTERPRET=1 on CPU (natively on a GPU): random and tied scores,
flat f, few finite entries, k at and past the number of finite entries, -inf padding anywhere, large offsets,
the chunked row loop, a CUDA graph replay, and a compile check for an H100 (sm_90) that needs no GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsek.ops.sparsek.kept import kept_threshold, kept_threshold_triton
from sparsek.ops.sparsek.reference import threshold_last

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                   reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
pytest.importorskip("triton")


def reference(kept_u: torch.Tensor, k: int) -> torch.Tensor:
    return threshold_last(kept_u, torch.full(kept_u.shape[:-1], float(k), dtype=torch.float64,
                                             device=kept_u.device))


def bisection_threshold(row: np.ndarray, k: int) -> float:
    """Independent oracle: theta - 1 <= tau < theta (theta the k-th largest) and f(tau) = k by bisection on
    exactly summed f; the midpoint of [z_(k+1), theta - 1] when f is flat at k (SPEC section 1)."""
    z = np.sort(row[row > -np.inf])[::-1]
    if k >= len(z):
        return -math.inf
    theta, below = z[k - 1], z[k]
    if theta - below >= 1:
        return 0.5 * (below + theta - 1)
    lo, hi = theta - 1.0, float(theta)
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            return mid
        if math.fsum(np.clip(z - mid, 0.0, 1.0)) >= k:
            lo = mid
        else:
            hi = mid


def check(kept_u: torch.Tensor, k: int, atol: float = 1e-9, block: int | None = None) -> torch.Tensor:
    """kept_threshold (or the kernel with a forced chunk size) against the reference and the oracle; -inf
    exactly where k >= #finite."""
    kept_u = kept_u.to(DEVICE)
    got = kept_threshold(kept_u, k) if block is None else kept_threshold_triton(kept_u, k, block=block)
    assert got.shape == kept_u.shape[:2] and got.dtype == torch.float64
    got = got.cpu()
    want = reference(kept_u, k).cpu()
    oracle = torch.tensor([bisection_threshold(row, k) for row in kept_u.cpu().flatten(0, 1).numpy()],
                          dtype=torch.float64).view_as(got)
    no_threshold = (kept_u > -torch.inf).sum(-1).cpu() <= k
    assert torch.equal(torch.isinf(got), no_threshold) and (got[no_threshold] == -torch.inf).all()
    assert not torch.isnan(got).any()
    finite = ~no_threshold
    for name, other in (("reference", want), ("oracle", oracle)):
        err = (got[finite] - other[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= atol, f"k={k}: max |kernel - {name}| = {err:.3e}\n{got}\n{other}"
    return got


def random_scores(shape, scale=1.0, offset=0.0, pad=0.3, generator=None):
    z = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + offset
    return z.masked_fill(torch.rand(shape, generator=generator) < pad, -torch.inf)


def with_n_finite(shape, n_finite, values, generator=None):
    """Each row gets exactly n_finite entries from `values` at random columns; -inf elsewhere."""
    z = torch.full(shape, -torch.inf, dtype=torch.float64)
    cols = torch.rand(shape, generator=generator).argsort(-1)[..., :n_finite]
    return z.scatter(-1, cols, values[..., :n_finite])


# --- against the reference and the oracle ---------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e-3, 0.0), (20.0, 0.0), (1.0, 1e4), (3.0, -1e4)])
def test_random_scores(scale, offset):
    g = torch.Generator().manual_seed(1)
    z = random_scores((2, 3, 37), scale, offset, generator=g)
    z[1, 2, :30] = -torch.inf                             # a row with few finite entries
    for k in (1, 5, 12):
        check(z, k)


@needs_kernels
def test_float32_scores_with_recency_slope():
    """The cache keeps float32 scores (u = x.w + slope * t) upcast to float64."""
    g = torch.Generator().manual_seed(2)
    z = (0.5 * torch.randn(2, 3, 37, generator=g) + 0.01 * torch.arange(37)).double()
    z[0, 1, 5:20] = -torch.inf
    for k in (1, 4, 9):
        check(z, k)


@needs_kernels
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_integer_scores_with_ties(offset):
    """Many ties, tau on breakpoints, and flat f (gaps of 1 or more under the k-th largest)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randint(-3, 4, (2, 3, 37), generator=g).double() + offset
    z = z.masked_fill(torch.rand(z.shape, generator=g) < 0.2, -torch.inf)
    z[0, 0] = torch.where(z[0, 0] > -torch.inf, 2.0 * z[0, 0], z[0, 0])   # gaps of 2
    z[1, 1, ::2] = -torch.inf
    for k in (1, 3, 7, 16):
        check(z, k)
    quarters = torch.randint(-12, 13, (2, 3, 37), generator=g).double() / 4 + offset
    for k in (1, 11):
        check(quarters, k)


@needs_kernels
def test_flat_midpoint_is_exact():
    """f == k on [z_(k+1), theta - 1]: the midpoint, as the reference computes it (gap 1 gives a point)."""
    g = torch.Generator().manual_seed(4)
    k = 4
    top = 5.0 + 0.3 * torch.rand(2, 3, k, generator=g, dtype=torch.float64)
    rest = 0.5 * torch.rand(2, 3, 20, generator=g, dtype=torch.float64)
    gaps = torch.tensor([[0.0, 1.7, 9.0], [-1.6, 3.25, 4.5]], dtype=torch.float64)[..., None]
    z = torch.cat([top, rest - gaps, torch.full((2, 3, 13), -torch.inf, dtype=torch.float64)], -1)
    z = z[..., torch.randperm(37, generator=g)]
    got = check(z, k, atol=1e-12)
    assert torch.equal(got, reference(z, k))
    # gap exactly 1: the interval is a point, z_(k+1) = theta - 1
    point = torch.tensor([3.0, 3.0, 2.0, 1.5, 1.0, -torch.inf, 0.25], dtype=torch.float64).view(1, 1, 7)
    assert check(point, 2, atol=1e-12).item() == 2.0


@needs_kernels
def test_k_around_the_number_of_finite_entries():
    g = torch.Generator().manual_seed(5)
    for n_finite in (1, 6, 37):
        z = with_n_finite((2, 3, 37), n_finite, torch.randn(2, 3, 37, generator=g, dtype=torch.float64), g)
        for k in {1, max(1, n_finite - 1), n_finite, n_finite + 1}:
            check(z, k)
    ints = with_n_finite((2, 3, 37), 9, torch.randint(0, 3, (2, 3, 37), generator=g).double(), g)
    for k in (1, 8, 9):
        check(ints, k)


@needs_kernels
def test_empty_rows_and_single_entries():
    z = torch.full((2, 3, 37), -torch.inf, dtype=torch.float64)
    z[0, 1, 17] = 2.5
    z[1, 0, 36] = -1e4
    z[1, 2, [0, 36]] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    check(z, 1)
    assert kept_threshold(z.to(DEVICE), 1).cpu()[1, 2].item() == 0.5   # two tied entries, k = 1: tau = 1 - 1/2
    check(torch.full((1, 2, 5), -torch.inf, dtype=torch.float64), 3)


@needs_kernels
@pytest.mark.parametrize("block", [16, 32])
def test_chunked_rows(block):
    """Rows longer than the kernel's chunk: the passes loop over 3 (2) chunks."""
    g = torch.Generator().manual_seed(6)
    check(random_scores((2, 3, 37), 2.0, generator=g), 5, block=block)
    check(torch.randint(-2, 3, (2, 3, 37), generator=g).double(), 6, block=block)


@needs_kernels
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_cache_sized_rows(kind):
    """A top-1024 cache's buffer: C = 4 * (topk + 1) = 4100 columns, about 3000 finite at random places."""
    g = torch.Generator().manual_seed(7)
    shape = (1, 2, 4100)
    if kind == "normal":
        z = random_scores(shape, 1.5, 3.0, pad=0.25, generator=g)
    else:
        z = (torch.randint(-40, 40, shape, generator=g).double() / 8).masked_fill(
            torch.rand(shape, generator=g) < 0.25, -torch.inf)
    check(z, 1024)
    if kind == "normal":
        check(z, 1024, block=1024)                        # the GPU's chunking: 5 chunks of 1024


@needs_kernels
@given(data=st.data())
def test_hypothesis_small_rows(data):
    n_cols = data.draw(st.integers(1, 24), label="C")
    values = st.one_of(st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0]),
                       st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False))
    rows = data.draw(st.lists(st.lists(values, min_size=n_cols, max_size=n_cols), min_size=1, max_size=3),
                     label="rows")
    k = data.draw(st.integers(1, n_cols + 1), label="k")
    check(torch.tensor(rows, dtype=torch.float64).unsqueeze(0), k)


# --- dispatch, validation ---------------------------------------------------------------------------------------


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(8)
    z = random_scores((2, 3, 37), generator=g)
    assert torch.equal(kept_threshold(z, 3), reference(z, 3))


@pytest.mark.parametrize("bad,k", [(torch.zeros(2, 3, 4), 1), (torch.zeros(2, 4, dtype=torch.float64), 1),
                                   (torch.zeros(1, 1, 4, dtype=torch.float64), 0),
                                   (torch.zeros(1, 1, 4, dtype=torch.float64), True),
                                   (torch.zeros(1, 1, 4, dtype=torch.float64), 2.0)])
def test_rejects_bad_inputs(bad, k):
    with pytest.raises(ValueError):
        kept_threshold(bad, k)


# --- GPU only -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (TRITON_INTERPRET unset)")
def test_cuda_graph_replay():
    """One decode step's threshold replays from a CUDA graph and follows the buffer's new contents."""
    g = torch.Generator().manual_seed(9)
    kept_u = random_scores((4, 8, 4100), pad=0.25, generator=g).cuda()
    kept_threshold(kept_u, 1024)                          # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tau = kept_threshold(kept_u, 1024)
    for seed in (10, 11):
        kept_u.copy_(random_scores(kept_u.shape, 2.0, pad=0.5, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(tau, reference(kept_u, 1024), atol=1e-9, rtol=0)


# --- compile for sm_90 without a GPU -------------------------------------------------------------------------

COMPILE_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsek.ops.common import tiles as host_tiles
    from sparsek.ops.sparsek import kept as threshold, kernels

    fn = kernels.kept_threshold_kernel
    tiles = host_tiles.threshold(host_tiles.SM90, 4100)
    warps = tiles.pop("num_warps")
    constexprs = dict(NEWTON_ITERS=threshold.NEWTON_ITERS, MAX_ITERS=threshold.MAX_ITERS, **tiles)
    signature = {name: "constexpr" if name in constexprs else {"Z": "*fp64", "TAU": "*fp64"}.get(name, "i32")
                 for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=1))
    assert "cvt.rn.f32.f64" not in compiled.asm["ptx"], "the threshold must stay in float64"
    print("compiled", fn.__name__, constexprs, flush=True)
''')


def test_kernel_compiles_for_sm90():
    """The interpreter accepts code the GPU compiler rejects; triton.compile for sm_90 catches it without a GPU
    (in a subprocess: the interpreter setting changes what triton.jit returns)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
