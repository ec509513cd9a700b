"""Host side of the Triton decode attention: split count, launches (ops/common/tiles.py picks their tiles).

Shape legend: B batch, Hq query heads, H KV heads, G = Hq // H, N cache entries, D head dim, S splits.
No host synchronisation and no data-dependent shapes: a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor

from ..common import GATE_IDS, LOG2E, interpreting, supports, tiles
from . import kernels

__all__ = ["cache_step", "decode_attention_triton", "supports"]

# Tests set this to fill kernel outputs (and partials) with NaN before launch, so an element no program
# writes shows up.
POISON_OUTPUTS = False
# A split shorter than this costs more in the merge than it gains in parallelism (GPU; the interpreter uses
# 2 tiles so that small test shapes are split too).
MIN_SPLIT_LEN = 256
MAX_SPLITS = 64


def _empty(shape, dtype: torch.dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def num_splits(batch_heads: int, n_entries: int, block_n: int, device: torch.device) -> int:
    """Splits of the N entries: enough programs for about two per SM, each split at least MIN_SPLIT_LEN long."""
    if interpreting():
        programs, min_len = 4, 2 * block_n
    else:
        programs, min_len = 2 * tiles.sm_count(device), MIN_SPLIT_LEN
    return max(1, min(triton.cdiv(programs, batch_heads), triton.cdiv(n_entries, min_len), MAX_SPLITS))


def decode_attention_triton(q: Tensor, keys: Tensor, values: Tensor, weight: Tensor, attended: Tensor,
                            gate: str = "kv", scale: float | None = None, *, splits: int | None = None,
                            nonfinite: Tensor | None = None) -> Tensor:
    """Triton twin of `decode_attention_reference` (inputs already validated; see `decode_attention`).

    q [B, Hq, D], keys and values [B, H, N, D], weight [B, H, N] float32 or float64 (read as float32),
    attended [B, H, N] bool or uint8 (0 / 1) -> [B, Hq, D] in q's dtype. splits: how many programs share one
    row's entries (None: picked from B * H, N and the GPU; tests force 1 and several). nonfinite: `cache_step`'s
    flags [B, H] (uint8); a row with any flag set outputs NaN, as `SparseKCache.step` specifies.
    """
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_entries = keys.shape[1], keys.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = _empty((batch, n_q_heads, head_dim), q.dtype, q.device)
    if batch == 0 or n_entries == 0:
        return out.zero_()

    # The kernel needs a unit last stride; a cache's buffers and q[:, t] slices already have one.
    q, keys, values = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, keys, values))
    weight = weight.to(torch.float32).contiguous()
    if attended.dtype == torch.bool:                     # bool pointers are awkward in Triton; same bytes
        attended = attended.contiguous().view(torch.uint8)

    decode = tiles.decode(tiles.target(q.device), head_dim)
    block_n = decode["attend"]["BLOCK_N"]
    if splits is None:
        splits = num_splits(batch * n_kv_heads, n_entries, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(n_entries, max(1, splits)), block_n) * block_n
    splits = triton.cdiv(n_entries, split_len)           # no empty split
    rows = batch * n_q_heads
    if splits > 1:
        m_part = _empty((rows, splits), torch.float32, q.device)
        l_part = _empty((rows, splits), torch.float32, q.device)
        acc_part = _empty((rows, splits, head_dim), torch.float32, q.device)
    else:
        m_part = l_part = acc_part = out                 # unused: FINAL writes out directly

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernels.decode_fwd_kernel[(splits, batch * n_kv_heads)](
            q, keys, values, weight, attended, weight if nonfinite is None else nonfinite, out, m_part, l_part,
            acc_part,
            q.stride(0), q.stride(1), *keys.stride()[:3], *values.stride()[:3],
            n_entries, n_kv_heads, group, split_len, splits, scale * LOG2E,
            GATE=GATE_IDS[gate], DOT="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, FINAL=splits == 1,
            FLAGGED=nonfinite is not None, BLOCK_H=triton.next_power_of_2(n_kv_heads), **decode["attend"])
        if splits > 1:
            kernels.decode_combine_kernel[(rows,)](
                m_part, l_part, acc_part, out, splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
                **decode["combine"])
    return out


def cache_step(cache, k: Tensor, v: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused twin of `SparseKCache._append` followed by `weights`, for a cache and inputs already checked
    (`SparseKCache.check_token`): one kernel updates the cache of every (row, KV head) in place and writes
    the mask of the step; then the row lengths advance.

    k, v [B, H, D], scores [B, H] -> (weight [B, H, N] float32, attended [B, H, N] uint8 0 / 1, nonfinite
    [B, H] uint8), the inputs of `decode_attention_triton`. A non-finite score enters the cache as -inf and is
    flagged in nonfinite, so the step needs no PyTorch ops around the kernels. No host synchronisation: the
    step can be captured in a CUDA graph. The mask is written as uint8, not bool viewed as bytes: inductor
    cannot lower a bool -> uint8 view under torch.compile.
    """
    from ..sparsek.kept import MAX_ITERS, NEWTON_ITERS

    batch, n_kv_heads, n_entries, head_dim = cache.keys.shape
    weight = _empty((batch, n_kv_heads, n_entries), torch.float32, k.device)
    attended = torch.empty((batch, n_kv_heads, n_entries), dtype=torch.uint8, device=k.device)
    nonfinite = torch.empty((batch, n_kv_heads), dtype=torch.uint8, device=k.device)
    if batch and n_kv_heads:
        k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
        n_kept = cache.kept_u.shape[-1]
        blocks = tiles.cache_step(tiles.target(k.device), n_kept, cache.topk, n_entries)
        with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
            kernels.cache_step_kernel[(batch * n_kv_heads,)](
                k, v, scores, cache.lengths, cache.keys, cache.values, cache.scores, cache.positions, cache.kept_u,
                cache.dropped_u, cache.tau_hint, weight, attended, nonfinite, k.stride(0), k.stride(1), v.stride(0),
                v.stride(1), scores.stride(0), scores.stride(1), n_kv_heads, n_kept, cache.window, cache.topk,
                NEWTON_ITERS=NEWTON_ITERS, MAX_ITERS=MAX_ITERS, HEAD_DIM=head_dim, HAS_WINDOW=cache.window > 0,
                HAS_TOPK=cache.topk > 0, **blocks)
    cache.lengths += 1
    return weight, attended, nonfinite
