"""The CPU twin of gathered.py's block attention for float32: native.c, built on first use (`common.clib`).

`native_sparsek_attention` runs the whole float32 CPU path as one autograd function: the selection (thresholds,
key ranges, block key lists) in ops/select/native.c, then the block attention in native.c; its backward runs the
attention's backward, then the thresholds'. One function instead of the PyTorch composition saves the fixed cost
of a few dozen small tensor operations and two autograd nodes, which is most of a short row's time. Calls of
more than _PAIRS_PER_THREAD (query, key) pairs split the blocks between OpenMP threads (torch's own pool) where
the compiler has OpenMP. Without a C compiler `available()` is False and gathered.py's PyTorch chunks run.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from ..common import GATE_IDS
from ..common.clib import build
from ..select import native as native_selection
from ..select.prefix import TAU_ROUNDING, key_ranges, native_gave_up, query_thresholds

_SOURCE = Path(__file__).with_name("native.c")
# -march=native for the vector width of this CPU (the build is cached per machine; without it where the
# compiler refuses the flag), and fused multiply-adds (ISO C mode turns them off).
_FLAGS = ["-O3", "-ffp-contract=fast", "-std=c99", "-shared", "-fPIC"]
_FLAG_SETS = [["-march=native", "-fopenmp", *_FLAGS], ["-march=native", *_FLAGS], _FLAGS]


class _Problem(ctypes.Structure):
    """native.c's struct problem."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "u", "tau", "start", "end", "lists")] + \
        [(name, ctypes.c_int64) for name in ("rows", "kv_heads", "t_len", "group", "head_dim", "n_slots", "block",
                                             "window", "gate")] + [("scale", ctypes.c_float)]


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it could not be built or loaded (the compiler's message)."""
    library = build(_SOURCE, _FLAG_SETS, also=(native_selection.SOURCE,))   # the selection runs in the same call
    if isinstance(library, str):
        return library
    library.sparsek_gathered_forward.restype = ctypes.c_int
    library.sparsek_gathered_forward.argtypes = [ctypes.POINTER(_Problem)] + [ctypes.c_void_p] * 3 \
        + [ctypes.c_int]
    library.sparsek_forward.restype = ctypes.c_int
    library.sparsek_forward.argtypes = [ctypes.POINTER(_Problem), ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 \
        + [ctypes.c_int]
    library.sparsek_backward.restype = ctypes.c_int
    library.sparsek_backward.argtypes = [ctypes.POINTER(_Problem)] + [ctypes.c_void_p] * 8 + [ctypes.c_int] * 2
    library.sparsek_openmp.restype = ctypes.c_int
    library.sparsek_finite_sum.restype = ctypes.c_int
    library.sparsek_finite_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.sparsek_saved_per_block.restype = ctypes.c_int64
    library.sparsek_saved_per_block.argtypes = [ctypes.POINTER(_Problem)]
    return library


def available() -> bool:
    """Whether the native attention can run here (it and the C selection compile on the first call)."""
    return not isinstance(_library(), str) and native_selection.available()


def openmp() -> bool:
    """Whether the native attention splits its blocks between threads (its build has OpenMP)."""
    return available() and bool(_library().sparsek_openmp())


# (query, key) pairs per OpenMP thread: fewer run on fewer threads, as waking a thread costs more than it saves
# on short rows (2-core CPU, topk = window = 16: two threads pay from T = 128, 24k pairs).
_PAIRS_PER_THREAD = 1 << 13


def _threads(n_pairs: int) -> int:
    """OpenMP threads for a call over n_pairs (query, key) pairs: one per _PAIRS_PER_THREAD, at most torch's
    intra-op threads (OpenMP's pool, which torch shares)."""
    return max(1, min(torch.get_num_threads() if openmp() else 1, n_pairs // _PAIRS_PER_THREAD))


def _check(status: int) -> None:
    if status:
        raise MemoryError("native.c could not allocate its scratch memory")


# Floats (4 bytes each) the forward may keep for the backward: each block's logits, masks and probabilities.
_SAVED_FLOATS = 1 << 23


def _pointer(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _problem(q, k, v, u, tau, lists, start, end, block, window, gate, scale) -> _Problem:
    """native.c's description of one call: pointers into the (contiguous) tensors, and the shapes."""
    batch, t_len, n_q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    return _Problem(*(x.data_ptr() for x in (q, k, v, u, tau, start, end, lists)), batch * kv_heads, kv_heads,
                    t_len, n_q_heads // kv_heads, head_dim, lists.shape[-1], block, min(window, t_len),
                    GATE_IDS[gate], scale)


def _select(scores: Tensor, u: Tensor, tau: Tensor, start: Tensor, end: Tensor,
            lists: Tensor, topk: int, window: int, block: int) -> Tensor:
    """The selection the one-call forward could not make, into the problem's buffers (u [R, T] float64 rows of
    the float32 scores [B, T, Hk], tau, start, end, lists): with topk = 0, none; where native.c's sweep gave up
    on bunched scores (it wrote u, start and end), the reference's thresholds. -> the block key lists."""
    rows, t_len = u.shape
    if topk == 0:
        u.copy_(scores.transpose(1, 2).reshape(rows, t_len))
        tau.fill_(-torch.inf)
        no_keys, _ = key_ranges(u, 0, window)                   # start = end: no key is ever selected
        start.copy_(no_keys)
        end.copy_(no_keys)
        return lists.fill_(-1)
    tau.copy_(query_thresholds(u, topk, window, torch.float32))
    return lists.copy_(native_selection.block_key_lists_native(start, end, topk, block, check=False))


class _NativeSparseK(torch.autograd.Function):
    """native_sparsek_attention's autograd: q, k, v and the scores carry gradients; topk, window, block, gate
    and scale do not. One C call each way (native.c's sparsek_forward and sparsek_backward)."""

    @staticmethod
    def forward(ctx, q, k, v, scores, topk, window, block, gate, scale):
        batch, t_len, n_q_heads, _ = q.shape
        rows = batch * k.shape[2]
        u, tau = torch.empty(rows, t_len, dtype=torch.float64), torch.empty(rows, t_len, dtype=torch.float64)
        start, end = torch.empty(rows, t_len, dtype=torch.int64), torch.empty(rows, t_len, dtype=torch.int64)
        lists = torch.empty(rows, -(-t_len // block), max(1, min(topk, t_len)), dtype=torch.int32)
        problem = _problem(q, k, v, u, tau, lists, start, end, block, window, gate, scale)
        out, lse = torch.empty_like(q), torch.empty(rows, t_len, problem.group, dtype=torch.float32)
        library = _library()
        # The backward recomputes each block's logits and masks, unless the forward can keep them in little memory.
        saved_floats = lists.shape[0] * lists.shape[1] * library.sparsek_saved_per_block(ctypes.byref(problem))
        keep = any(ctx.needs_input_grad[:4]) and saved_floats <= _SAVED_FLOATS
        saved = torch.empty(saved_floats if keep else 0, dtype=torch.float32)
        ctx.threads = _threads(batch * t_len * n_q_heads * (lists.shape[-1] + block + min(window, t_len)))
        status = 1
        if topk:
            worst = ctypes.c_double(0)
            status = library.sparsek_forward(
                ctypes.byref(problem), scores.data_ptr(), topk, TAU_ROUNDING,
                native_selection.work_per_row(t_len, topk, window), ctypes.byref(worst),
                native_selection.sweep_threads(rows, t_len, topk, window), out.data_ptr(), lse.data_ptr(),
                _pointer(saved if keep else None), ctx.threads)
            _check(status < 0)
            status = status and native_gave_up(status, worst.value, torch.float32)     # or raises ValueError
        if status:                                             # topk = 0, or bunched scores: selected in Python
            _select(scores, u, tau, start, end, lists, topk, window, block)
            _check(library.sparsek_gathered_forward(ctypes.byref(problem), out.data_ptr(), lse.data_ptr(),
                                                    _pointer(saved if keep else None), ctx.threads))
        ctx.save_for_backward(q, k, v, u, tau, lists, start, end, out, lse, saved)
        ctx.arguments, ctx.keep = (block, window, gate, scale), keep
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, u, tau, lists, start, end, out, lse, saved = ctx.saved_tensors
        # Built again: the saved tensors may be new ones (activation checkpointing recomputes the forward).
        problem = _problem(q, k, v, u, tau, lists, start, end, *ctx.arguments)
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scores = problem.gate != GATE_IDS["none"] and ctx.needs_input_grad[3]
        grad_scores = torch.empty(k.shape[:3], dtype=torch.float32) if scores else None
        _check(_library().sparsek_backward(
            ctypes.byref(problem), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(),
            _pointer(saved if ctx.keep else None), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
            _pointer(grad_scores), ctx.threads, native_selection.threshold_backward_threads(*u.shape)))
        return grad_q, grad_k, grad_v, grad_scores, None, None, None, None, None


@torch.compiler.disable   # raw pointers into tensors: Dynamo must not trace (or reorder) this call
def native_sparsek_attention(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int, gate: str,
                             scale: float, block: int) -> Tensor | None:
    """gathered.py's SparseK attention in C, for float32 q, k, v and scores (validated and centred by
    `sparsek_attention`): q [B, T, Hq, D], k and v [B, T, Hk, D], scores [B, T, Hk] -> [B, T, Hq, D], with blocks
    of `block` queries; None where k or v do not sum to a finite number (NaN or inf in them, or values near
    the float32 limit), for the caller's PyTorch path. Raises ValueError where the selection's thresholds would
    not round to float32 (`prefix._check_rounding`)."""
    q, k, v, scores = (x.contiguous() for x in (q, k, v, scores))
    library = _library()
    if not (library.sparsek_finite_sum(k.data_ptr(), k.numel()) and library.sparsek_finite_sum(v.data_ptr(),
                                                                                                v.numel())):
        return None
    return _NativeSparseK.apply(q, k, v, scores, topk, window, block, gate, scale)
