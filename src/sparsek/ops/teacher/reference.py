"""What a full-attention teacher gives each key: the teacher signal of scorer distillation, in chunked PyTorch.

Shape legend: B batch, T sequence, Hq query heads, Hk KV heads, G = Hq // Hk query heads per KV head, D head dim,
Q queries in one chunk.

For key j of KV head h the teacher looks at the original softmax probabilities a_ij (full causal attention,
a_i. summing to 1 over j <= i) of the queries that see j outside their window, i >= j + window, over the G
query heads of the group, and reduces them:
  "sum"  sum over those (i, g) of a_ij: the attention mass j would lose if it were never selected;
  "mean" that sum over the number of (i, g) pairs, T - j - window + 1 times G: mass per query that sees it;
  "max"  the largest a_ij among them: does any query need j.
Keys no query sees outside its window (the last `window` ones) get 0. Each chunk of queries computes its full
rows of logits once (softmax needs the whole row) and adds them into the [B, T, Hk] result column-wise, so
memory is O(Q * T), never T x T.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

REDUCTIONS = ("sum", "mean", "max")

# Elements of one chunk's [B, Hk, G, Q, T] logits.
_CHUNK_ELEMENTS = 1 << 24


def _causal_probs(q_c: Tensor, k_c: Tensor, scale: float, t_len: int
                  ) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor]]:
    """Full causal softmax rows, one chunk of queries at a time: q_c [B, T, Hk, G, D], k_c [B, T, Hk, D] (both in
    the compute dtype) -> yields (q_start, q_end, i [Q, 1] query positions, j [T] key positions,
    probs [B, Hk, G, Q, N]) over the N = q_end keys the chunk's queries may see (0 beyond each query's own)."""
    batch, _, n_kv_heads, group, _ = q_c.shape
    j = torch.arange(t_len, device=q_c.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * n_kv_heads * group * t_len))
    for q_start in range(0, t_len, chunk):
        q_end = min(q_start + chunk, t_len)
        i = torch.arange(q_start, q_end, device=q_c.device)[:, None]                # [Q, 1]
        logits = torch.einsum("bqhgd,bnhd->bhgqn", q_c[:, q_start:q_end], k_c[:, :q_end]) * scale
        probs = torch.softmax(logits.masked_fill(j[:q_end] > i, -torch.inf), dim=-1)   # [B, Hk, G, Q, N]
        yield q_start, q_end, i, j, probs


@torch.no_grad()
def teacher_mass_reference(q: Tensor, k: Tensor, *, window: int, reduction: str = "mean",
                           scale: float | None = None) -> Tensor:
    """Teacher attention mass per key: q [B, T, Hq, D], k [B, T, Hk, D] -> [B, T, Hk] float32.

    Computed in float32 (float64 for float64 inputs). See the module docstring for the reductions.
    """
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_c = q.to(cdtype).view(batch, t_len, n_kv_heads, group, head_dim)
    k_c = k.to(cdtype)
    out = torch.zeros(batch, n_kv_heads, t_len, dtype=cdtype, device=q.device)   # [B, Hk, T]
    for _, q_end, i, j, probs in _causal_probs(q_c, k_c, scale, t_len):
        seen_outside = j[:q_end] <= i - window                                      # [Q, N]
        probs = probs.masked_fill(~seen_outside, 0)
        if reduction == "max":
            out[..., :q_end] = torch.maximum(out[..., :q_end], probs.amax(dim=(2, 3)))
        else:
            out[..., :q_end] += probs.sum(dim=(2, 3))
    if reduction == "mean":
        j = torch.arange(t_len, device=q.device)
        seen_by = (t_len - window - j).clamp(min=0) * group                         # (i, g) pairs per key
        out = out / seen_by.clamp(min=1)
    return out.permute(0, 2, 1).float() if cdtype != torch.float64 else out.permute(0, 2, 1)


@torch.no_grad()
def kept_attention_reference(q: Tensor, k: Tensor, scores: Tensor, *, topk: int, window: int,
                             scale: float | None = None) -> Tensor:
    """Share of each query's full causal attention that falls on the keys SparseK attends to (its window and
    its selection S_i from `scores`): q [B, T, Hq, D], k [B, T, Hk, D], scores [B, T, Hk] -> [B, T, Hq] float32.

    1 means the selection lost nothing of what the original model looked at; queries with at most topk
    candidates keep everything and score 1.
    """
    from ..select import prefix_selection

    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    sel = prefix_selection(scores.detach().float(), topk, window)
    start, end = (x.permute(0, 2, 1)[:, :, None, None, :] for x in (sel.start, sel.end))   # [B, Hk, 1, 1, T]
    q_c = q.float().view(batch, t_len, n_kv_heads, group, head_dim)
    k_c = k.float()
    out = torch.empty(batch, n_kv_heads, group, t_len, dtype=torch.float32, device=q.device)
    for q_start, q_end, i, j, probs in _causal_probs(q_c, k_c, scale, t_len):
        in_window = j[:q_end] > i - window                                          # [Q, N] (with j <= i)
        selected = (start[..., :q_end] <= i) & (i < end[..., :q_end])              # [B, Hk, 1, Q, N]
        out[..., q_start:q_end] = (probs * (in_window | selected)).sum(-1)
    return out.reshape(batch, n_q_heads, t_len).permute(0, 2, 1)
