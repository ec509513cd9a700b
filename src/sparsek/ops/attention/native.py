"""The CPU twin of gathered.py's block attention for float32: native.c, built on first use (`common.clib`).

`native_gathered_attention` takes the selection that `gathered.sparsek_attention_gathered` computed (thresholds,
key ranges, block key lists) and returns the same output and gradients as its PyTorch chunks. Large calls split
the blocks between torch's intra-op threads (`clib.in_parts`). Without a C compiler
`available()` is False and the PyTorch chunks run.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from ..common import GATE_IDS
from ..common.clib import build, in_parts

_SOURCE = Path(__file__).with_name("native.c")
# -march=native for the vector width of this CPU (the build is cached per machine; without it where the
# compiler refuses the flag), and fused multiply-adds (ISO C mode turns them off).
_FLAGS = ["-O3", "-ffp-contract=fast", "-std=c99", "-shared", "-fPIC"]
_FLAG_SETS = [["-march=native", *_FLAGS], _FLAGS]


class _Problem(ctypes.Structure):
    """native.c's struct problem."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "u", "tau", "start", "end", "lists")] + \
        [(name, ctypes.c_int64) for name in ("rows", "kv_heads", "t_len", "group", "head_dim", "n_slots", "block",
                                             "window", "gate")] + [("scale", ctypes.c_float)]


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it could not be built or loaded (the compiler's message)."""
    library = build(_SOURCE, _FLAG_SETS)
    if isinstance(library, str):
        return library
    library.sparsek_gathered_forward.restype = ctypes.c_int
    library.sparsek_gathered_forward.argtypes = [ctypes.POINTER(_Problem)] + [ctypes.c_void_p] * 3 \
        + [ctypes.c_int64] * 2
    library.sparsek_gathered_backward.restype = ctypes.c_int
    library.sparsek_gathered_backward.argtypes = [ctypes.POINTER(_Problem)] + [ctypes.c_void_p] * 9 \
        + [ctypes.c_int64] * 2
    library.sparsek_saved_per_block.restype = ctypes.c_int64
    library.sparsek_saved_per_block.argtypes = [ctypes.POINTER(_Problem)]
    return library


def available() -> bool:
    """Whether the native attention can run here (it compiles on the first call)."""
    return not isinstance(_library(), str)


# (query, key) pairs per thread below which the blocks run on the calling thread alone: handing work to a
# second thread costs more than it saves on short rows (2-core CPU, topk = window = 16 and 64).
_PAIRS_PER_THREAD = 1 << 18


def _split(n_items: int, n_pairs: int, work) -> list:
    """work(first, last) -> (status, extra) over parts of range(n_items), one part per _PAIRS_PER_THREAD pairs
    (`clib.in_parts`); the extras, in part order. RuntimeError if a part could not allocate its scratch."""
    results = in_parts(n_items, n_pairs // _PAIRS_PER_THREAD, work)
    if any(status for status, _ in results):
        raise RuntimeError("native.c could not allocate its scratch memory")
    return [extra for _, extra in results]


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


class _NativeGathered(torch.autograd.Function):
    """native_gathered_attention's autograd: q, k, v, u and tau carry gradients; lists, start, end, block,
    window, gate and scale do not."""

    @staticmethod
    def forward(ctx, q, k, v, u, tau, lists, start, end, block, window, gate, scale):
        batch, t_len, n_q_heads, _ = q.shape
        problem = _problem(q, k, v, u, tau, lists, start, end, block, window, gate, scale)
        out, lse = torch.empty_like(q), torch.empty(problem.rows, t_len, problem.group)
        library = _library()
        n_blocks = problem.rows * lists.shape[1]
        # The backward recomputes each block's logits and masks, unless the forward can keep them in little memory.
        saved_floats = n_blocks * library.sparsek_saved_per_block(ctypes.byref(problem))
        keep = any(ctx.needs_input_grad[:5]) and saved_floats <= _SAVED_FLOATS
        saved = torch.empty(saved_floats if keep else 0)
        ctx.n_pairs = batch * t_len * n_q_heads * (lists.shape[-1] + block + min(window, t_len))
        _split(n_blocks, ctx.n_pairs, lambda first, last: (library.sparsek_gathered_forward(
            ctypes.byref(problem), out.data_ptr(), lse.data_ptr(), _pointer(saved if keep else None), first, last),
            None))
        ctx.save_for_backward(q, k, v, u, tau, lists, start, end, out, lse, saved)
        ctx.arguments, ctx.keep = (block, window, gate, scale), keep
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, u, tau, lists, start, end, out, lse, saved = ctx.saved_tensors
        # Built again: the saved tensors may be new ones (activation checkpointing recomputes the forward).
        problem = _problem(q, k, v, u, tau, lists, start, end, *ctx.arguments)
        grad_out = grad_out.contiguous()
        scores = problem.gate != GATE_IDS["none"] and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        grad_q = torch.empty_like(q)
        grad_tau = torch.empty_like(tau) if scores else None
        library = _library()

        def work(first, last):
            # Key gradients gather from many blocks: each part adds into buffers of its own (zeroed in C).
            grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
            grad_u = torch.empty_like(u) if scores else None
            status = library.sparsek_gathered_backward(
                ctypes.byref(problem), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(),
                _pointer(saved if ctx.keep else None), grad_q.data_ptr(),
                grad_k.data_ptr(), grad_v.data_ptr(), _pointer(grad_u), _pointer(grad_tau), first, last)
            return status, (grad_k, grad_v, grad_u)

        parts = _split(problem.rows * lists.shape[1], ctx.n_pairs, work)
        grad_k, grad_v, grad_u = parts[0]
        for part_k, part_v, part_u in parts[1:]:
            grad_k += part_k
            grad_v += part_v
            if grad_u is not None:
                grad_u += part_u
        return grad_q, grad_k, grad_v, grad_u, grad_tau, None, None, None, None, None, None, None


@torch.compiler.disable   # raw pointers into tensors: Dynamo must not trace (or reorder) this call
def native_gathered_attention(q: Tensor, k: Tensor, v: Tensor, u: Tensor, tau: Tensor, lists: Tensor, start: Tensor,
                              end: Tensor, block: int, window: int, gate: str, scale: float) -> Tensor:
    """gathered.py's block attention in C, for float32 q, k, v, scores and thresholds with finite k and v.

    q [B, T, Hq, D], k and v [B, T, Hk, D], u (the scores) and tau (the selection's thresholds) [B, T, Hk],
    start and end [B, T, Hk] int64 (the selection's key ranges), lists [B * Hk, NB, K] int64 (the key lists of
    blocks of `block` queries; entries outside [0, T) are empty) -> [B, T, Hq, D].
    """
    tensors = [x.contiguous() for x in (q, k, v, u, tau, lists, start, end)]
    return _NativeGathered.apply(*tensors, block, window, gate, scale)
