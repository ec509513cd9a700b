"""Host side of fused SparseK attention: selection on the device, kernel launches (ops/common/tiles.py picks
their tiles), autograd.

Shape legend: B batch, T sequence, Hq / Hk query / KV heads, G = Hq // Hk, D head dim, R = B * Hk.
Saved for backward: q, k, v, o, the log-sum-exp [B * Hq, T], per-key / per-query vectors (u, tau, start,
end: [R, T]) and the forward's block key lists [R, T / 128, topk] int32 (8 entries per token and row at
topk = 1024), which the backward's list pass walks too.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import triton
from torch import Tensor

from ..common import GATE_IDS, LOG2E, interpreting, tiles
from ..graphs import GraphedFunction
from ..select.blocks import block_key_lists
from ..select.fused import block_key_lists_triton, select_rows_triton, threshold_backward_triton
from ..select.prefix import select_rows
from . import kernels

# Tests set this to fill kernel outputs with NaN before launch, so an element no program writes shows up.
POISON_OUTPUTS = False
# Under the interpreter the list pass splits its blocks between programs below this many programs (on a GPU:
# the SM count). Small, so that the tests see both paths; a test raises it to split several slot tiles.
INTERPRETER_LIST_PROGRAMS = 2


def empty_output(shape, dtype: torch.dtype, device) -> Tensor:
    """A kernel output: torch.empty, or NaN-filled while POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _on_device_of(x: Tensor):
    """Launch on x's GPU, whatever the current device is (Triton launches on the current one)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def select_on_device(u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    # The PyTorch selection is exact too but launches thousands of small kernels; on CPU (tests) it is faster.
    return select_rows_triton(u, topk, window) if u.is_cuda else select_rows(u, topk, window)


def block_lists_on_device(start: Tensor, end: Tensor, topk: int, block: int) -> Tensor:
    return block_key_lists_triton(start, end, topk, block) if start.is_cuda else \
        block_key_lists(start.long(), end.long(), topk, block)


FORWARD_BACKENDS = ("auto", "triton", "gluon")
# Whether "auto" takes the Gluon forward where it runs: on since the attention GPU tests passed with backend
# "gluon" (H100, 2026-12-05). False puts every shape back on the tl forward.
GLUON_BY_DEFAULT = True
# Whether the backward takes the Gluon dq pass (`gluon.dq_pass_gluon`) wherever the forward takes the Gluon
# forward (backend "auto" or "gluon"): on since the attention GPU tests passed with it (H100, 2026-12-06).
GLUON_DQ = True
# The same for the Gluon list pass (`gluon.list_pass_gluon`, head dim 64 and 128): off until its GPU tests pass.
GLUON_LIST = False


def on_sm90(q: Tensor) -> bool:
    """Whether q lives on an sm_90 GPU (H100, H200), where the Gluon forward is written to run."""
    return q.is_cuda and not interpreting() and torch.cuda.get_device_capability(q.device) == (9, 0)


_GLUON_VERSION_WARNED = False


def choose_forward(q: Tensor, backend: str, *others: Tensor) -> str:
    """The forward kernel of the fused path for q: "gluon" (`gluon.py`, sm_90 only) or "tl" (`kernels.py`).

    backend "triton" keeps the portable tl forward; "gluon" forces the Gluon forward and raises ValueError
    saying why where it cannot run; "auto" takes it wherever it runs while GLUON_BY_DEFAULT is on (on an
    H100 it was faster at each head dim it takes: 64, 128 and 256). Then an sm_90 GPU that misses it only
    because of the installed Triton gets one warning, once; other inputs (float32, unaligned tensors) take
    the tl forward without a word. `others` (k, v) are checked with q. The backward passes are tl kernels
    either way."""
    global _GLUON_VERSION_WARNED
    if backend == "triton" or (backend == "auto" and not GLUON_BY_DEFAULT):
        return "tl"
    try:
        from . import gluon
    except ImportError as err:                    # a Triton without triton.experimental.gluon
        problem, version_only = f"this Triton has no Gluon ({err})", True
    else:
        problem, version_only = gluon.cannot_run(q, *others), not gluon.gluon_api_supported()
    if problem is None:
        return "gluon"
    if backend == "gluon":
        raise ValueError(f"backend='gluon' cannot run here: {problem}")
    if version_only and on_sm90(q) and not _GLUON_VERSION_WARNED:
        _GLUON_VERSION_WARNED = True
        warnings.warn(f"sparsek: the Gluon forward is off ({problem}); using the tl forward", stacklevel=3)
    return "tl"


def choose_dq(q: Tensor, backend: str, *others: Tensor) -> str:
    """The dq pass's kernel: "gluon" where `choose_forward` takes the Gluon forward while GLUON_DQ is on, else
    "tl". The list and band passes are tl kernels either way."""
    return choose_forward(q, backend, *others) if GLUON_DQ else "tl"


def choose_list(q: Tensor, backend: str, *others: Tensor) -> str:
    """The list pass's kernel: "gluon" where `choose_forward` takes the Gluon forward while GLUON_LIST is on
    and the Gluon list pass has a config for the head dim, else "tl"."""
    if not GLUON_LIST or tiles.gluon_list(tiles.SM90, q.shape[-1]) is None:
        return "tl"
    return choose_forward(q, backend, *others)


def _forward_selection(u: Tensor, topk: int, window: int,
                       block: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """u [R, T] -> tau (float32), start, end (int32) [R, T], the block key lists [R, NB, K] and the forward's
    poison [1] (float32: 0, or NaN if u is not finite; checked on the device, as a host-side check would stall
    the GPU at every call)."""
    tau, start, end = select_on_device(u, topk, window)
    start, end = start.int(), end.int()
    poison = torch.where(torch.isfinite(u).all(), 0.0, float("nan")).float().reshape(1)
    return tau.float(), start, end, block_lists_on_device(start, end, topk, block), poison


def _threshold_backward(u: Tensor, tau: Tensor, dtau: Tensor, du: Tensor, window: int) -> tuple[Tensor]:
    """du [R, T] plus (in place) the gradient of the scores through the thresholds, from dtau [B * Hq, T]."""
    return (threshold_backward_triton(u, tau, window, dtau, du),)


# Up to 2^19 scores (16 heads x 32k tokens) the selection is launch-bound: replay it as a CUDA graph. (The
# limit counts the largest input: for the threshold backward that is dtau, [B * Hq, T].)
GRAPH_MAX_ELEMENTS = 1 << 19
forward_selection = GraphedFunction(_forward_selection, GRAPH_MAX_ELEMENTS)
graphed_threshold_backward = GraphedFunction(_threshold_backward, GRAPH_MAX_ELEMENTS)


def grouped_strides(*tensors: Tensor) -> list[tuple[int, int, int]]:
    """Each tensor's (batch, time, head) strides, one tuple per tensor: the kernels take them grouped."""
    return [tuple(t.stride()[:3]) for t in tensors]


def score_rows(x: Tensor) -> Tensor:
    """[B, T, H] -> [B * H, T] contiguous."""
    batch, t_len, heads = x.shape
    return x.permute(0, 2, 1).reshape(batch * heads, t_len).contiguous()


def fused_forward(q: Tensor, k: Tensor, v: Tensor, u: Tensor, tau: Tensor, start: Tensor, end: Tensor,
                  lists: Tensor, poison: Tensor, window: int, gate: str, scale: float) -> tuple[Tensor, Tensor]:
    """o [B, T, Hq, D] and lse [B * Hq, T] (log2 units). u, tau float32 and start, end int32, all [R, T];
    lists [R, NB, K] and poison [1] from _forward_selection with the forward's BLOCK_M."""
    batch, t_len, n_q_heads, head_dim = q.shape
    window = min(window, t_len)                  # same pairs; keeps the kernels' int32 index math small
    group = n_q_heads // k.shape[2]
    forward = tiles.forward(tiles.target(q.device), head_dim)
    n_blocks, n_slots = lists.shape[1], lists.shape[2]
    o = empty_output(q.shape, q.dtype, q.device)
    lse = empty_output((batch * n_q_heads, t_len), torch.float32, q.device)
    grid = (n_blocks, batch * n_q_heads)
    kernels.sparsek_fwd_kernel[grid](
        q, k, v, u, tau, start, end, lists, o, lse, poison, *grouped_strides(q, k, v, o),
        t_len, n_slots, n_blocks, window, n_q_heads, group, scale * LOG2E,
        GATE=GATE_IDS[gate], DOT=_dot_precision(q.dtype), HEAD_DIM=head_dim, **forward)
    return o, lse


def fused_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, u: Tensor, tau: Tensor,
                   start: Tensor, end: Tensor, lists: Tensor, topk: int, window: int, gate: str, scale: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (dtypes of q, k, v), the direct score gradient du [R, T] and dtau [B * Hq, T] (float32).
    lists: the forward's block key lists; backend picks the dq and list passes' kernels (`choose_dq`,
    `choose_list`)."""
    window = min(window, q.shape[1])             # same pairs; keeps the kernels' int32 index math small
    if choose_dq(q, backend, k, v) == "gluon":
        from .gluon import dq_pass_gluon
        dq, dtau, delta = dq_pass_gluon(do, q, k, v, o, lse, u, tau, start, end, lists, window, gate, scale)
    else:
        dq, dtau, delta = dq_pass(do, q, k, v, o, lse, u, tau, start, end, lists, window, gate, scale)
    # The list pass writes the sums of listed keys to float32 scratch; the band pass adds them to its own and
    # stores dk, dv in the dtype of k, v.
    if choose_list(q, backend, k, v) == "gluon":
        from .gluon import list_pass_gluon
        scratch = list_pass_gluon(do, q, k, v, lse, delta, u, tau, end, lists, topk, window, gate, scale)
    else:
        scratch = list_pass(do, q, k, v, lse, delta, u, tau, end, lists, topk, window, gate, scale)
    dk, dv, du = band_pass(do, q, k, v, lse, delta, u, tau, start, end, scratch, window, gate, scale)
    return dq, dk, dv, du, dtau


def dq_pass(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, u: Tensor, tau: Tensor,
            start: Tensor, end: Tensor, lists: Tensor, window: int, gate: str,
            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's dq pass: dq (dtype of q), dtau and delta = rowsum(dO * O) [B * Hq, T] (float32), which
    the other two passes read. Window already clamped to T."""
    batch, t_len, n_q_heads, head_dim = q.shape
    backward = tiles.backward(tiles.target(q.device), head_dim, n_q_heads // k.shape[2])
    if o.stride() != do.stride():                                         # the dq pass reads O with do's strides
        o = o.contiguous()
    dq = empty_output(q.shape, q.dtype, q.device)
    dtau = empty_output((batch * n_q_heads, t_len), torch.float32, q.device)
    delta = empty_output((batch * n_q_heads, t_len), torch.float32, q.device)
    kernels.sparsek_bwd_dq_kernel[(triton.cdiv(t_len, backward["dq"]["BLOCK_M"]), batch * n_q_heads)](
        q, k, v, u, tau, start, end, lists, do, o, lse, delta, dq, dtau, *grouped_strides(q, k, v, do),
        t_len, lists.shape[2], lists.shape[1], window, n_q_heads, n_q_heads // k.shape[2], scale,
        GATE=GATE_IDS[gate], DOT=_dot_precision(q.dtype), HEAD_DIM=head_dim, LIST_BLOCK=backward["list"]["BLOCK_M"],
        **backward["dq"])
    return dq, dtau, delta


def band_pass(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, u: Tensor, tau: Tensor,
              start: Tensor, end: Tensor, scratch: tuple[Tensor, Tensor, Tensor], window: int, gate: str,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's band pass: dk, dv (dtypes of k, v) and du [R, T] (float32), the band's sums plus the list
    pass's (scratch: its dk, dv, du). Window already clamped to T."""
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    backward = tiles.backward(tiles.target(q.device), head_dim, n_q_heads // n_kv_heads)
    dk = empty_output(k.shape, k.dtype, k.device)
    dv = empty_output(v.shape, v.dtype, v.device)
    du = empty_output((batch * n_kv_heads, t_len), torch.float32, k.device)
    kernels.sparsek_bwd_band_kernel[(triton.cdiv(t_len, backward["band"]["BLOCK_N"]), batch * n_kv_heads)](
        q, k, v, u, tau, start, end, do, lse, delta, *scratch, dk, dv, du, *grouped_strides(q, k, v, do),
        t_len, triton.cdiv(t_len, backward["band"]["BLOCK_M"]), window, n_q_heads, n_q_heads // n_kv_heads, scale,
        GATE=GATE_IDS[gate], DOT=_dot_precision(q.dtype), HEAD_DIM=head_dim, LIST_BLOCK=backward["list"]["BLOCK_M"],
        **backward["band"])
    return dk, dv, du


def list_pass_chunks(n_blocks: int, programs: int, programs_wanted: int) -> tuple[int, int]:
    """(chunks, blocks per program) of the list pass, for `programs` = slot tiles x rows. One program per slot
    tile walks all blocks and stores each key's sums once. When that leaves at least half of the GPU idle
    (programs_wanted: the SM count), the blocks are split in chunks whose programs add atomically into zeroed
    scratch (a program fills an SM: splitting 128 programs in 256 on 132 SMs only adds a second, short wave)."""
    chunks = max(1, min(n_blocks, programs_wanted // programs))
    blocks_per_program = triton.cdiv(n_blocks, chunks)
    return triton.cdiv(n_blocks, blocks_per_program), blocks_per_program


def list_pass(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, u: Tensor, tau: Tensor,
              end: Tensor, lists: Tensor, topk: int, window: int, gate: str,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's list pass: float32 dk, dv (shape of k) and du [R, T] of the pairs in the block lists,
    written only in the rows of listed keys. delta [B * Hq, T] from the dq pass; window already clamped to T."""
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    if topk == 0:                       # no key is listed and the band pass reads no scratch row
        empty = torch.empty(1, dtype=torch.float32, device=k.device)
        return empty, empty, empty
    list_tiles = tiles.backward(tiles.target(q.device), head_dim, n_q_heads // n_kv_heads)["list"]
    n_blocks, n_slots = lists.shape[1], lists.shape[2]
    slot_tiles = triton.cdiv(n_slots, list_tiles["BLOCK_N"])
    programs_wanted = INTERPRETER_LIST_PROGRAMS if interpreting() else tiles.sm_count(q.device)
    chunks, blocks_per_program = list_pass_chunks(n_blocks, slot_tiles * batch * n_kv_heads, programs_wanted)
    scratch = torch.zeros if chunks > 1 else empty_output
    dk_list, dv_list = (scratch(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))
    du_list = scratch((batch * n_kv_heads, t_len), dtype=torch.float32, device=k.device)
    kernels.sparsek_bwd_list_kernel[(slot_tiles, batch * n_kv_heads, chunks)](
        q, k, v, u, tau, end, lists, do, lse, delta, dk_list, dv_list, du_list, *grouped_strides(q, k, v, do),
        t_len, n_slots, n_blocks, blocks_per_program, window, n_q_heads, n_q_heads // n_kv_heads, scale,
        GATE=GATE_IDS[gate], DOT=_dot_precision(q.dtype), HEAD_DIM=head_dim, ATOMIC=chunks > 1,
        ONE_HEAD=n_q_heads == n_kv_heads, **list_tiles)
    return dk_list, dv_list, du_list


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# torch.library custom ops: torch.compile sees two opaque ops with fake (shape-only) versions, so a model
# with SparseK layers compiles without a graph break at the attention call.
@torch.library.custom_op("sparsek::attention_forward", mutates_args=())
def attention_forward_op(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, topk: int, window: int, gate: str,
                         scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> o [B, T, Hq, D], lse [B * Hq, T], u, tau (float32), start, end (int32), all [R, T], and the block
    key lists [R, NB, K] (int32). o is all NaN if the scores are not finite. backend picks the forward kernel
    (`choose_forward`); here, inside the op, torch.compile never traces that choice."""
    with _on_device_of(q):
        # Select in the scores' own precision (float64 scores may differ in the last float32 bit); the kernels
        # read them as float32.
        u_exact = score_rows(scores.detach())
        block = tiles.forward(tiles.target(q.device), q.shape[-1])["BLOCK_M"]
        tau, start, end, lists, poison = forward_selection((u_exact,), (topk, window, block))
        u = u_exact.to(torch.float32, copy=True)  # an op output must not alias its input
        if choose_forward(q, backend, k, v) == "gluon":
            from .gluon import fused_forward_gluon
            o, lse = fused_forward_gluon(q, k, v, u, tau, start, end, lists, poison, window, gate, scale)
        else:
            o, lse = fused_forward(q, k, v, u, tau, start, end, lists, poison, window, gate, scale)
    return o, lse, u, tau, start, end, lists


@attention_forward_op.register_fake
def _(q, k, v, scores, topk, window, gate, scale, backend):
    batch, t_len, n_q_heads, _ = q.shape
    rows = batch * k.shape[2]
    vec = q.new_empty(rows, t_len, dtype=torch.float32)
    idx = q.new_empty(rows, t_len, dtype=torch.int32)
    block = tiles.forward(tiles.target(q.device), q.shape[-1])["BLOCK_M"]
    lists = q.new_empty(rows, -(-t_len // block), max(1, min(topk, t_len)), dtype=torch.int32)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch * n_q_heads, t_len, dtype=torch.float32), vec, torch.empty_like(vec), idx,
            torch.empty_like(idx), lists)


@torch.library.custom_op("sparsek::attention_backward", mutates_args=())
def attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, u: Tensor,
                          tau: Tensor, start: Tensor, end: Tensor, lists: Tensor, topk: int, window: int, gate: str,
                          scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv and dscores [B, T, Hk] float32 (zeros for gate "none"), the tau path included. backend
    picks the dq pass's kernel (`choose_dq`)."""
    with _on_device_of(q):
        return _attention_backward(do, q, k, v, o, lse, u, tau, start, end, lists, topk, window, gate, scale,
                                   backend)


def _attention_backward(do, q, k, v, o, lse, u, tau, start, end, lists, topk, window, gate, scale, backend):
    dq, dk, dv, du, dtau = fused_backward(do.contiguous(), q, k, v, o, lse, u, tau, start, end, lists,
                                          topk, window, gate, scale, backend)
    batch, t_len = q.shape[:2]
    n_kv_heads = k.shape[2]
    if gate == "none":
        du = torch.zeros_like(du)
    else:
        du = graphed_threshold_backward((u, tau, dtau, du), (min(window, t_len),))[0]  # same result, fewer graphs
    return dq, dk, dv, du.view(batch, n_kv_heads, t_len).permute(0, 2, 1).contiguous()


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, u, tau, start, end, lists, topk, window, gate, scale, backend):
    batch, t_len = q.shape[:2]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(batch, t_len, k.shape[2], dtype=torch.float32))


class FusedSparseKAttention(torch.autograd.Function):
    """Selection plus fused kernels; one gradient per input (q, k, v, scores)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scores: Tensor, topk: int, window: int, gate: str,
                scale: float, backend: str) -> Tensor:
        # The kernels need a unit last stride and write dk, dv with k's layout: keep contiguous copies (a no-op
        # for contiguous inputs, a copy for views such as q, k, v split from one fused projection).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse, u, tau, start, end, lists = attention_forward_op(q, k, v, scores, topk, window, gate, scale, backend)
        ctx.save_for_backward(q, k, v, o, lse, u, tau, start, end, lists)
        ctx.config = (topk, window, gate, scale, scores.dtype, backend)
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        topk, window, gate, scale, score_dtype, backend = ctx.config
        dq, dk, dv, dscores = attention_backward_op(do, *ctx.saved_tensors, topk, window, gate, scale, backend)
        dscores = dscores.to(score_dtype) if gate != "none" else None
        return dq, dk, dv, dscores, None, None, None, None, None


def sparsek_attention_fused(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                            gate: str = "kv", scale: float | None = None, backend: str = "auto") -> Tensor:
    """Fused Triton SparseK attention of one padded batch; same contract as `sparsek_attention_reference`.
    backend: "auto", "triton" or "gluon", which picks the forward kernel (`choose_forward`)."""
    if backend not in FORWARD_BACKENDS:
        raise ValueError(f"backend must be one of {FORWARD_BACKENDS}, got {backend!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return FusedSparseKAttention.apply(q, k, v, scores, topk, window, gate, float(scale), backend)
