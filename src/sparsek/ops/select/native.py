"""The CPU twin of `prefix.select_rows`: native.c, compiled on first use with the system's C compiler.

PyTorch runs the reference selection as a few hundred small tensor operations whose fixed cost dominates on a
CPU until rows are thousands of keys long; native.c does one pass per row instead (same results, tested
against the reference by name). It needs a C compiler (`cc`, or $CC); without one, `available()` is False and
"auto" keeps the reference. `common.clib` builds it once per source version and loads it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from ..common.clib import build

SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O2", "-std=c99", "-shared", "-fPIC"]
# OpenMP (torch's own thread pool) splits the rows between threads; without it where the compiler refuses it.
_FLAG_SETS = [["-fopenmp", *_FLAGS], _FLAGS]


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it could not be built or loaded (the compiler's message)."""
    library = build(SOURCE, _FLAG_SETS)
    if isinstance(library, str):
        return library
    library.sparsek_select_rows.restype = ctypes.c_int
    library.sparsek_select_rows.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 \
        + [ctypes.c_int, ctypes.c_double] + [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int]
    library.sparsek_row_medians.restype = ctypes.c_int
    library.sparsek_row_medians.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    library.sparsek_block_lists.restype = ctypes.c_int
    library.sparsek_block_lists.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    library.sparsek_threshold_backward.restype = ctypes.c_int
    library.sparsek_threshold_backward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p,
                                                                                                  ctypes.c_int]
    return library


def available() -> bool:
    """Whether the native selection can run here (it compiles on the first call)."""
    return not isinstance(_library(), str)


def _loaded() -> ctypes.CDLL:
    """The library; RuntimeError (the compiler's message) where it could not be built: callers check
    `available()` first."""
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(library)
    return library


def unavailable_reason() -> str:
    """Why the native selection cannot run here ("" when it can)."""
    return "" if available() else str(_library())


# Sweep steps per prefix beyond which the thresholds go to the O(T log T) reference (see native.c): a trained
# scorer's rows need about topk + a few; rows whose scores bunch within 1 of each other need up to T.
_WORK_PER_PREFIX = 256
# Prefixes x topk (about the sweep's work) per OpenMP thread, rounded up: fewer run on one thread (2-core CPU,
# topk 16: 2 rows of 128, 3.6k, take 33 us on two threads against 39 on one; 2 rows of 64, 1.5k, 23 us either way).
_SWEEP_PER_THREAD = 1 << 11


# sparsek_select_rows' status bits (native.c).
TOO_MUCH_WORK, ROUNDING, SPREAD_EXCEEDED = 1, 2, 4


@torch.compiler.disable   # raw pointers into tensors: Dynamo must not trace (or reorder) this call
@torch.no_grad()
def select_rows_native(u: Tensor, topk: int, window: int, dtype: torch.dtype = torch.float64
                       ) -> tuple[Tensor, Tensor, Tensor, int, float]:
    """The selection of CPU rows (finite; topk >= 1), u [R, T] float64 -> tau [R, T] float64 (-inf before the
    first candidates), the key ranges start and end [R, T] int64 of `prefix.key_ranges`, the status bits and
    the largest |tau| that fails `prefix._check_rounding` for `dtype` (the dtype tau is returned in).

    Status: ROUNDING and SPREAD_EXCEEDED where that check fails (the caller raises); TOO_MUCH_WORK where the
    rows' scores bunch so that the sweep would cost O(T^2): tau is then incomplete and the caller takes the
    reference's thresholds."""
    from .prefix import TAU_ROUNDING

    library = _loaded()
    u = u.contiguous()
    rows, t_len = u.shape
    topk, window = min(topk, t_len), min(window, t_len)      # same selection; and they fit the C int64
    shift = torch.empty(rows, dtype=torch.float64)    # as the reference: relative to the candidates' median
    _check_allocated(library.sparsek_row_medians(u.data_ptr(), rows, t_len, t_len - window, shift.data_ptr()))
    tau = torch.empty(rows, t_len, dtype=torch.float64)
    start, end = torch.empty(rows, t_len, dtype=torch.int64), torch.empty(rows, t_len, dtype=torch.int64)

    worst = ctypes.c_double(0)
    status = library.sparsek_select_rows(u.data_ptr(), shift.data_ptr(), rows, t_len, topk, window,
                                         dtype == torch.float32, TAU_ROUNDING, tau.data_ptr(), ctypes.byref(worst),
                                         start.data_ptr(), end.data_ptr(), work_per_row(t_len, topk, window),
                                         sweep_threads(rows, t_len, topk, window))
    _check_allocated(status < 0)
    return tau, start, end, status, worst.value


def work_per_row(t_len: int, topk: int, window: int) -> int:
    """The sweep steps a row may take before native.c gives up on its thresholds (_WORK_PER_PREFIX)."""
    return max(0, t_len - window) * (2 * min(topk, t_len) + _WORK_PER_PREFIX)


def sweep_threads(rows: int, t_len: int, topk: int, window: int) -> int:
    """OpenMP threads for the selection of `rows` rows (_SWEEP_PER_THREAD)."""
    work = rows * max(0, t_len - window) * min(topk, t_len)
    return max(1, min(torch.get_num_threads(), rows, -(-work // _SWEEP_PER_THREAD)))


def _check_allocated(failed: int) -> None:
    if failed:
        raise MemoryError("native.c could not allocate its scratch memory")


@torch.compiler.disable
def block_key_lists_native(start: Tensor, end: Tensor, topk: int, block: int, *, check: bool = True) -> Tensor:
    """`blocks.block_key_lists` of CPU rows (topk >= 1, T >= 1): start, end [R, T] int64 -> [R, NB, K] int32.
    ValueError unless the ranges could come from a selection's (0 <= start <= end <= T); check=False skips
    that for ranges straight from `prefix_selection`."""
    library = _loaded()
    if start.dtype != torch.int64 or end.dtype != torch.int64 or start.shape != end.shape or start.dim() != 2:
        raise ValueError(f"start and end must be [R, T] int64, got {tuple(start.shape)} {start.dtype} and "
                         f"{tuple(end.shape)} {end.dtype}")
    rows, t_len = start.shape
    if check and not ((start >= 0) & (start <= end) & (end <= t_len)).all():
        raise ValueError("start and end must satisfy 0 <= start <= end <= T (selection ranges)")
    start, end = start.contiguous(), end.contiguous()
    n_slots = max(1, min(topk, t_len))
    lists = torch.empty((rows, -(-t_len // block), n_slots), dtype=torch.int32)
    _check_allocated(library.sparsek_block_lists(start.data_ptr(), end.data_ptr(), rows, t_len, min(topk, t_len),
                                                 block, n_slots, lists.data_ptr()))
    return lists


def threshold_backward_threads(rows: int, t_len: int) -> int:
    """OpenMP threads for the thresholds' backward: a row costs about 2 T log T steps; a thread per 2^14."""
    return max(1, min(torch.get_num_threads(), rows, rows * t_len * max(1, t_len.bit_length()) // (1 << 13)))


@torch.compiler.disable
def threshold_backward_native(u: Tensor, tau: Tensor, window: int, grad_tau: Tensor) -> Tensor:
    """`prefix.threshold_backward` of CPU rows: u, tau (non-decreasing along each row), grad_tau [R, T] float64
    -> [R, T] float64."""
    library = _loaded()
    u, tau, grad_tau = (x.double().contiguous() for x in (u, tau, grad_tau))
    rows, t_len = u.shape
    grad_u = torch.zeros_like(u)                                 # native.c adds into it
    _check_allocated(library.sparsek_threshold_backward(u.data_ptr(), tau.data_ptr(), grad_tau.data_ptr(), rows,
                                                        t_len, min(window, t_len), grad_u.data_ptr(),
                                                        threshold_backward_threads(rows, t_len)))
    return grad_u
