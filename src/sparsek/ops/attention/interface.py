"""Public entry point of SparseK attention: validates inputs, handles packed batches, picks a backend."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..common import BACKENDS, check_backend, check_budget, check_gate, check_qkv, check_scale, kernel_for
from ..select import native
from ..select.prefix import TRITON_SCORE_LIMIT
from .gathered import sparsek_attention_gathered
from .reference import sparsek_attention_reference

# Imported up front when triton is installed, not inside the call: torch.compile then traces the dispatch
# without meeting an import statement.
try:
    from . import fused
except ImportError:  # triton is an optional extra
    fused = None

# The attention backends: the shared ones plus "gluon", which forces the fused path's Gluon forward.
ATTENTION_BACKENDS = BACKENDS + ("gluon",)


def gather_is_cheaper(t_len: int, topk: int, window: int) -> bool:
    """Whether backend "auto" off CUDA takes the gathered path rather than the dense reference for sequences of
    length t_len. With the native selection (ops/select/native.c) it is faster at every length (forward +
    backward, 2-core CPU, topk = window = 16: 1.4 against 2.1 ms at T = 4, 2.6 against 12.2 ms at T = 256).
    Without a C compiler its PyTorch selection costs as much as the reference's, and the gathered path wins
    once the reference's O(T^2) work overtakes it, near T = 2 * (topk + window)."""
    return native.available() or t_len >= max(64, 2 * (topk + window))


def _validate(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, topk, window, gate, scale, backend) -> None:
    check_qkv(q, k, v)
    if not isinstance(scores, Tensor) or scores.dim() != 3:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [B, T, H_kv] tensor, got {shape}")
    if scores.shape != k.shape[:3]:
        raise ValueError(f"scores must be [B, T, H_kv] = {tuple(k.shape[:3])}, got {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"scores must be float32 or float64 (keep the scorer in float32), got {scores.dtype}")
    if scores.device != q.device:
        raise ValueError(f"scores must be on the device of q, k, v ({q.device}), got {scores.device}")
    check_budget(topk, window)
    check_gate(gate)
    check_scale(scale)
    check_backend(backend, ATTENTION_BACKENDS)


def _validate_cu_seqlens(cu_seqlens: Tensor, q: Tensor) -> list[int]:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.dtype == torch.bool:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1]")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed into B = 1, got B = {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least one sequence, got {bounds[:4]}...")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("cu_seqlens must be sorted (non-decreasing)")
    if bounds[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens must end at the packed length T = {q.shape[1]}, got {bounds[-1]}")
    return bounds


def sparsek_attention(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                      gate: str = "kv", scale: float | None = None, cu_seqlens: Tensor | None = None,
                      backend: str = "auto") -> Tensor:
    """Causal SparseK attention (arXiv 2406.16747; SPEC section 3).

    Query i attends to its sliding window W_i = {i - window < j <= i} with weight 1 and to the `topk` best
    earlier keys S_i (by score, ties to the newer key) among C_i = {j <= i - window}, weighted by the SPARSEK
    mask m_ij = clip(u_j - tau_i, 0, 1) of C_i.

    Args:
        q: [B, T, Hq, D] queries.
        k, v: [B, T, Hk, D] keys and values; Hq must be a multiple of Hk (query head h uses KV head
            h // (Hq // Hk), grouped-query attention).
        scores: [B, T, Hk] float32 or float64 key scores u (e.g. from `sparsek.layers.Scorer`).
        topk: selected keys per query (>= 0); topk >= T gives full causal attention.
        window: sliding-window width (>= 0); not both 0.
        gate: "kv" (default, the paper's K^ = m K, V^ = m V: logits scale * m_ij * q.k_j, values m_ij v_j),
            "v" (logits unscaled, values m_ij v_j) or "none" (hard top-k; no gradient reaches the scores).
        scale: softmax scale, default D ** -0.5.
        cu_seqlens: optional [N + 1] integer offsets of N sequences packed along T (B must be 1), as in
            flash-attention; each sequence restarts at position 0 and attends only within itself.
        backend: "triton" (fused kernels: CUDA, or CPU under TRITON_INTERPRET=1; the portable tl forward),
            "gluon" (the fused kernels with the Gluon forward: sm_90 and Triton 3.6), "gather" (PyTorch over each
            query block's selected keys and window band: O(T * (topk + window)) time and memory), "reference"
            (exact PyTorch, float64-able oracle: O(T log T) selection, chunked O(T^2) attention) or "auto"
            (triton on CUDA when available, with the Gluon forward where it runs; elsewhere gather when
            `gather_is_cheaper`, else reference).

    Returns:
        [B, T, Hq, D] in q's dtype. Gradients reach q, k, v and scores (through m and through tau).

    Each (batch, KV head) row of scores whose median lies 2^14 or more from 0 has it subtracted before any
    backend runs, which keeps a large common offset such as 1e8 + noise exact (SPARSEK is shift invariant).
    Non-finite scores raise ValueError for CPU tensors, and so do thresholds that float32 cannot hold within
    2^-10 (for the fused kernels: any 2^14 or more from 0 after that shift). On CUDA the fused kernels return an
    all-NaN output instead: checking on the host would make every call wait for the GPU.
    """
    _validate(q, k, v, scores, topk, window, gate, scale, backend)
    # On the CPU the largest magnitude is one cheap reduction: NaN or inf where any score is, and below
    # TRITON_SCORE_LIMIT there is nothing to centre.
    largest = None
    if scores.device.type == "cpu" and not torch.compiler.is_compiling() and scores.numel():
        largest = float(scores.detach().abs().max())
        if not math.isfinite(largest):
            raise ValueError("scores contain NaN or inf")

    if q.shape[0] == 0 or q.shape[1] == 0:                              # nothing to attend (or to divide by)
        return q.new_zeros(q.shape)
    if largest is None or largest >= TRITON_SCORE_LIMIT:
        scores = _centred(scores)

    bounds = None if cu_seqlens is None else _validate_cu_seqlens(cu_seqlens, q)
    fused_attention = kernel_for(backend, fused, "sparsek_attention_fused", q)   # "gluon": fused, Gluon forward
    triton_path = fused_attention is not None
    if triton_path:
        attention = functools.partial(fused_attention, backend=backend)
    else:
        longest = q.shape[1] if bounds is None else max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        gather = backend == "gather" or (backend == "auto" and not q.is_cuda
                                         and gather_is_cheaper(longest, topk, window))
        attention = sparsek_attention_gathered if gather else sparsek_attention_reference

    def attend(q_, k_, v_, s_):
        s_ = _float32_thresholds_checked(s_, topk, window) if triton_path else s_  # prefix_selection checks the rest
        return attention(q_, k_, v_, s_, topk=topk, window=window, gate=gate, scale=scale)

    if bounds is None:
        return attend(q, k, v, scores)
    sequences = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if not triton_path:                                                           # padding would only add work
        return torch.cat([attend(q[:, a:b], k[:, a:b], v[:, a:b], scores[:, a:b]) for a, b in sequences], dim=1)
    outputs = {}
    for group in padding_groups(sequences):
        out = _attend_padded(attend, q, k, v, scores, group)
        outputs.update(zip((a for a, _ in group), out.split([b - a for a, b in group])))
    return torch.cat([outputs[a] for a, _ in sequences]).unsqueeze(0)                 # back in packed order


def _centred(scores: Tensor) -> Tensor:
    """scores [B, T, Hk] minus their row's median, per (batch, KV head), where that is TRITON_SCORE_LIMIT or more
    from 0: the thresholds are then found near 0. Other rows are returned bit for bit: their float32 thresholds
    are already within 2^-10, and the cache, which decodes from the raw scores, keeps matching them exactly."""
    # The median, not the mean or the max: it is one of the row's own scores, so a common offset cancels exactly
    # (1e8 + noise: both are multiples of float32's unit there, 8), and one far score (3e38 among values near 1)
    # cannot drag it away from the others. One value per packed row is a valid shift for each of its sequences.
    median = scores.detach().median(dim=1, keepdim=True).values
    # Detached, it is a constant per row: d(scores - c)/d(scores) = 1, so the scores' gradient is unchanged.
    centred = scores - torch.where(median.abs() >= TRITON_SCORE_LIMIT, median, 0)
    # Opposite signs near the float range overflow: hold those at its edge, where no threshold the dtype can hold
    # reaches them. Scores that were inf stay inf (the fused kernels turn them into an all-NaN output).
    edge = torch.finfo(scores.dtype).max
    return torch.where(torch.isfinite(scores), centred.clamp(-edge, edge), centred)


def _float32_thresholds_checked(scores: Tensor, topk: int, window: int) -> Tensor:
    """The centred scores [B, T, Hk] for the fused kernels, whose thresholds are float32: ValueError on the CPU
    where a threshold may lie TRITON_SCORE_LIMIT or more from 0 (float32 would move a soft mask by more than
    2^-10 there); on CUDA the scores turn NaN instead, so the output is all NaN without a wait for the GPU."""
    n_cand = scores.shape[1] - window                                    # candidates of the last query
    if topk == 0 or n_cand <= topk:
        return scores                                                    # no query has a threshold
    # tau_i lies in [theta_i - 1, theta_i) for theta_i the k-th best candidate, which never falls as i grows:
    # take it at the first prefix with a threshold (topk + 1 keys) and at the longest. Far scores outside that
    # range (outliers) do not matter: their masks are exactly 0 or 1.
    first = scores[:, :topk + 1].kthvalue(2, dim=1).values              # [B, Hk]
    last = scores[:, :n_cand].kthvalue(n_cand - topk + 1, dim=1).values  # [B, Hk]
    fits = ((first - 1 > -TRITON_SCORE_LIMIT) & (last < TRITON_SCORE_LIMIT)).all()
    if scores.device.type == "cpu" and not torch.compiler.is_compiling():
        if not fits:
            raise ValueError(f"scores too large for the float32 thresholds of backend='triton': one lies "
                             f"{TRITON_SCORE_LIMIT:g} or more from its row's median score (or from 0), where float32 "
                             f"would not keep the soft masks summing to topk; use backend='reference' with float64 "
                             f"scores")
        return scores
    return torch.where(fits, scores, torch.nan)


def padding_groups(sequences: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Group packed sequences [(start, end), ...] so that padding each group to its longest sequence at most
    doubles its tokens: longest first, a group takes the next (shorter) sequences while it stays within that
    bound. Sequences of similar length then share one padded batch (one set of kernel launches), and a long
    sequence among short ones does not make them all pad to its length."""
    groups: list[list[tuple[int, int]]] = []
    tokens = 0
    for a, b in sorted(sequences, key=lambda ab: ab[0] - ab[1]):                  # longest first (stable)
        longest = groups[-1][0][1] - groups[-1][0][0] if groups else 0
        if groups and (len(groups[-1]) + 1) * longest <= 2 * (tokens + b - a):
            groups[-1].append((a, b))
            tokens += b - a
        else:
            groups.append([(a, b)])
            tokens = b - a
    return groups


def _attend_padded(attend, q: Tensor, k: Tensor, v: Tensor, scores: Tensor, group: list[tuple[int, int]]) -> Tensor:
    """Packed sequences [(start, end), ...] of [1, total, ...] inputs as one padded batch [N, max_len, ...]: one
    set of kernel launches instead of N. -> their outputs [tokens, Hq, D], one sequence after the other.

    Padding goes after each sequence's last token, so causality keeps every real query away from it; the
    padded rows' outputs are dropped, so nothing flows back into them either.
    """
    if len(group) == 1:
        (a, b), = group
        return attend(q[:, a:b], k[:, a:b], v[:, a:b], scores[:, a:b])[0]
    starts = torch.tensor([a for a, _ in group], device=q.device)
    lengths = torch.tensor([b - a for a, b in group], device=q.device)
    offsets = torch.arange(max(b - a for a, b in group), device=q.device)
    real = offsets < lengths[:, None]                                            # [N, max_len]
    index = torch.where(real, starts[:, None] + offsets, 0)                       # [N, max_len]; pads read token 0

    def batch(x: Tensor) -> Tensor:                                               # [1, total, ...] -> [N, L, ...]
        return x[0][index]

    out = attend(batch(q), batch(k), batch(v), batch(scores))                     # [N, max_len, Hq, D]
    return out[real]
