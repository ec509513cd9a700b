"""Reference SparseK attention in PyTorch: exact to SPEC section 3, any float dtype, CPU or GPU.

Shape legend: B batch, T sequence, Hq query heads, Hk KV heads, G = Hq // Hk query heads per KV head,
D head dim; a chunk of Q queries attends to the N = (last query of the chunk + 1) keys before it.

Selection comes from `prefix_selection` in O(T log T); the attention itself is dense per query chunk and
masked, so it costs O(T^2) time but only O(chunk * T) memory: each chunk is recomputed in the backward pass
(activation checkpointing) instead of keeping its probabilities alive.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..common import compute_dtype
from ..select import prefix_selection

# Elements of one chunk's [B, Hk, G, Q, N] logits; a few times this many bytes are live at once.
_CHUNK_ELEMENTS = 1 << 24


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, u: Tensor, tau: Tensor, start: Tensor, end: Tensor,
                  q_start: int, window: int, gate: str, scale: float) -> Tensor:
    """Attention of queries [q_start, q_start + Q) over keys [0, N).

    q [B, Q, Hk, G, D]; k, v [B, N, Hk, D]; u, start, end [B, N, Hk]; tau [B, Q, Hk] -> [B, Q, Hk, G, D].
    """
    n_q, n_k = q.shape[1], k.shape[1]
    i = torch.arange(q_start, q_start + n_q, device=q.device).view(1, 1, n_q, 1)   # [1, 1, Q, 1]
    j = torch.arange(n_k, device=q.device).view(1, 1, 1, n_k)                      # [1, 1, 1, N]
    in_window = (j <= i) & (j > i - window)                                        # [1, 1, Q, N]
    start_j, end_j = start.permute(0, 2, 1).unsqueeze(2), end.permute(0, 2, 1).unsqueeze(2)  # [B, Hk, 1, N]
    selected = (start_j <= i) & (i < end_j)                                        # [B, Hk, Q, N]
    attended = (in_window | selected).unsqueeze(2)                                 # [B, Hk, 1, Q, N]

    # A key whose k or v holds NaN/inf would poison every query through 0 * NaN in the dense products, masked
    # or not. Such keys (rare: usually none) are zeroed in the dense products and added back one pair at a
    # time with torch.where, so only the queries that attend to them see them, forward and backward.
    bad = (~(torch.isfinite(k) & torch.isfinite(v))).flatten(2).any(-1).any(0).nonzero().squeeze(1)  # [Nb]
    if bad.numel():
        zero = torch.zeros(n_k, dtype=torch.bool, device=k.device).index_fill(0, bad, True).view(1, n_k, 1, 1)
        k, v, k_bad, v_bad = k.masked_fill(zero, 0), v.masked_fill(zero, 0), k[:, bad], v[:, bad]
        seen = attended[..., bad].unsqueeze(-1)                                   # [B, Hk, 1, Q, Nb, 1]

        def per_pair(x: Tensor) -> Tensor:  # [B, Nb, Hk, D] -> [B, Hk, 1, Q, Nb, D], 0 where not attended
            return torch.where(seen, x.permute(0, 2, 1, 3)[:, :, None, None], 0)

    logits = torch.einsum("bqhgd,bnhd->bhgqn", q, k) * scale                       # [B, Hk, G, Q, N]
    if bad.numel():
        q_b = q.permute(0, 2, 3, 1, 4).unsqueeze(-2)                               # [B, Hk, G, Q, 1, D]
        logits = logits.index_copy(-1, bad, (q_b * per_pair(k_bad)).sum(-1) * scale)
    if gate == "none":
        weight = None
    else:
        u_j = u.permute(0, 2, 1).unsqueeze(2)                                     # [B, Hk, 1, N]
        tau_i = tau.permute(0, 2, 1).unsqueeze(3)                                 # [B, Hk, Q, 1]
        # m_ij = clip(u_j - tau_i, 0, 1) where selected, 1 in the window (unused elsewhere). Its gradient flows
        # only strictly inside (0, 1), as SPARSEK's does: an entry sitting exactly at 1 (tau = theta - 1 when
        # the k-th best is a gap of 1 above the rest) is clipped. u is finite, so a tau_i of -inf gives +inf,
        # clipped to 1 with zero gradient: no NaN reaches the backward.
        gap = u_j - tau_i
        free = (gap > 0) & (gap < 1)
        gap = torch.where(free, gap, gap.detach().clamp(0, 1))
        weight = torch.where(selected, gap, 1.0).to(q.dtype).unsqueeze(2)          # [B, Hk, 1, Q, N]
    if gate == "kv":
        logits = logits * weight
    logits = logits.masked_fill(~attended, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if weight is not None:
        probs = probs * weight
    out = torch.einsum("bhgqn,bnhd->bhgqd", probs, v)                             # [B, Hk, G, Q, D]
    if bad.numel():
        out = out + (probs[..., bad].unsqueeze(-1) * per_pair(v_bad)).sum(-2)
    return out.permute(0, 3, 1, 2, 4)


def sparsek_attention_reference(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                                gate: str = "kv", scale: float | None = None, upcast: bool = True) -> Tensor:
    """SparseK attention of one padded batch (inputs already validated; see `sparsek_attention`).

    q [B, T, Hq, D], k and v [B, T, Hk, D], scores [B, T, Hk] -> [B, T, Hq, D] in q's dtype.
    Half-precision inputs are computed in float32 unless upcast=False (which gives the error of plain
    half-precision PyTorch, the yardstick for the kernels); float32 and float64 in their own precision.
    The selection runs on the scores in float32, or in float64 when the scores or the inputs are float64 (as
    the fused path does: scores 1e-12 apart must not tie).
    """
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    cdtype = compute_dtype(q.dtype) if upcast else q.dtype
    score_dtype = torch.float64 if torch.float64 in (q.dtype, scores.dtype) else torch.float32

    u = scores.to(score_dtype)
    selection = prefix_selection(u, topk, window)
    tau = selection.tau if gate != "none" else selection.tau.detach()
    q_c = q.to(cdtype).view(batch, t_len, n_kv_heads, group, head_dim)
    k_c, v_c = k.to(cdtype), v.to(cdtype)

    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * n_q_heads * t_len))
    use_checkpoint = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, scores))
    out = []
    for q_start in range(0, t_len, chunk):
        q_end = min(q_start + chunk, t_len)
        args = (q_c[:, q_start:q_end], k_c[:, :q_end], v_c[:, :q_end], u[:, :q_end], tau[:, q_start:q_end],
                selection.start[:, :q_end], selection.end[:, :q_end], q_start, window, gate, scale)
        out.append(checkpoint(_attend_chunk, *args, use_reentrant=False) if use_checkpoint
                   else _attend_chunk(*args))
    return torch.cat(out, dim=1).reshape(batch, t_len, n_q_heads, head_dim).to(q.dtype)
