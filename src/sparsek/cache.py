"""Constant-memory KV cache of one SparseK attention layer, and exact token-by-token decoding (PyTorch).

Shape legend: B batch, H KV heads, Hq query heads (G = Hq // H per KV head), D head dim, k = topk slots,
w = window, M scalar scores kept for the threshold.

Per batch row and KV head the cache holds (SPEC section 4):
  * the window: a ring of the w newest keys, values and scores;
  * the selection: k slots of key, value, score and position, the top-k of all older tokens (the candidates);
  * the candidate scores that can still move the threshold: a key leaves the top-k for good, and tau never
    falls below min(theta - 1, u_(k+1)) (theta the k-th best score, u_(k+1) the next), so scores below that
    bound are dropped. They are scalars; the KV memory is (k + w) pairs whatever the context length.
Decoding one token: it enters the window; the token leaving the window becomes a candidate and, if it beats
the worst selected key (ties go to the newer key), takes its slot; tau is the SPARSEK threshold of the kept
scores; the query attends to the window (m = 1) and the slots (m = clip(u - tau, 0, 1)), as in the parallel
forward. Not yet: batches whose rows are at different positions (left padding), a GPU decode kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops.attention.interface import GATES
from .ops.select import prefix_selection
from .ops.sparsek.reference import _threshold_last


class SparseKCache:
    """Window ring + k selected slots + kept candidate scores for one layer. Build with `prefill`."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, topk: int, window: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if topk < 0 or window < 0 or topk + window == 0:
            raise ValueError(f"need topk >= 0, window >= 0 and not both 0, got {topk}, {window}")
        self.topk, self.window, self.position = topk, window, 0
        shape = (batch, n_kv_heads)
        self.window_k = torch.zeros(*shape, window, head_dim, dtype=dtype, device=device)
        self.window_v = torch.zeros_like(self.window_k)
        self.window_u = torch.zeros(*shape, window, dtype=torch.float32, device=device)
        self.slot_k = torch.zeros(*shape, topk, head_dim, dtype=dtype, device=device)
        self.slot_v = torch.zeros_like(self.slot_k)
        self.slot_u = torch.zeros(*shape, topk, dtype=torch.float32, device=device)
        self.slot_pos = torch.full((*shape, topk), -1, dtype=torch.int64, device=device)  # -1: empty
        self.kept_u = torch.empty(*shape, 0, dtype=torch.float64, device=device)          # candidate scores

    @property
    def n_candidates(self) -> int:
        return max(0, self.position - self.window)

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values (the part that scales with head_dim): constant in the context."""
        return sum(t.numel() * t.element_size() for t in (self.window_k, self.window_v, self.slot_k, self.slot_v))

    @classmethod
    def prefill(cls, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int) -> SparseKCache:
        """The cache after a prompt: k, v [B, T, H, D], scores [B, T, H] (the same the parallel forward saw)."""
        batch, t_len, heads, head_dim = k.shape
        cache = cls(batch, heads, head_dim, topk, window, k.dtype, k.device)
        cache.position = t_len
        n_win = min(window, t_len)
        if n_win:  # ring slot of position p is p % window
            ring = torch.arange(t_len - n_win, t_len, device=k.device) % window
            cache.window_k[:, :, ring] = k[:, t_len - n_win:].transpose(1, 2)
            cache.window_v[:, :, ring] = v[:, t_len - n_win:].transpose(1, 2)
            cache.window_u[:, :, ring] = scores[:, t_len - n_win:].transpose(1, 2).float()
        n_cand = cache.n_candidates
        if topk and n_cand:
            sel = prefix_selection(scores.detach().float(), topk, window)
            last = t_len - 1
            selected = (sel.start <= last) & (last < sel.end)                              # [B, T, H]
            order = torch.argsort(selected.transpose(1, 2).int(), dim=-1, descending=True, stable=True)
            picked = order[..., : min(topk, n_cand)]                                       # [B, H, n]
            n = picked.shape[-1]
            cache.slot_k[:, :, :n] = k.transpose(1, 2).gather(2, picked[..., None].expand(-1, -1, -1, head_dim))
            cache.slot_v[:, :, :n] = v.transpose(1, 2).gather(2, picked[..., None].expand(-1, -1, -1, head_dim))
            cache.slot_u[:, :, :n] = scores.transpose(1, 2).float().gather(2, picked)
            cache.slot_pos[:, :, :n] = picked
            cache.kept_u = scores[:, :n_cand].transpose(1, 2).double().contiguous()
            cache._prune()
        return cache

    def _prune(self) -> None:
        """Drop candidate scores below min(theta - 1, u_(k+1)): no later threshold can depend on them."""
        kept = self.kept_u
        if kept.shape[-1] <= self.topk + 1:
            return
        ranked = torch.sort(kept, dim=-1, descending=True).values
        bound = torch.minimum(ranked[..., self.topk - 1] - 1, ranked[..., self.topk])
        ranked = torch.where(ranked >= bound[..., None], ranked, -torch.inf)
        width = max(self.topk + 1, int((ranked > -torch.inf).sum(-1).max()))
        self.kept_u = ranked[..., :width].contiguous()

    def _admit(self, k: Tensor, v: Tensor, u: Tensor, position: int) -> None:
        """A new candidate [B, H, D] / [B, H]: keep its score, and give it a slot if it makes the top-k."""
        if self.topk == 0:                   # window only: no threshold, nothing to keep
            return
        self.kept_u = torch.cat([self.kept_u, u.double()[..., None]], dim=-1)
        if position < self.topk:                  # candidate j is the (j + 1)-th: slots still filling
            slot = torch.full(u.shape, position, dtype=torch.int64, device=u.device)
            take = torch.ones_like(u, dtype=torch.bool)
        else:
            # Worst selected key: lowest score, ties to the older one (which the newer candidate then beats).
            worst_u = self.slot_u.min(dim=-1).values
            tied = self.slot_u == worst_u[..., None]
            slot = torch.where(tied, self.slot_pos, torch.iinfo(torch.int64).max).argmin(-1)
            take = u.float() >= worst_u
        index = slot[..., None]
        new_u = torch.where(take, u.float(), self.slot_u.gather(-1, index).squeeze(-1))
        new_pos = torch.where(take, position, self.slot_pos.gather(-1, index).squeeze(-1))
        self.slot_u.scatter_(-1, index, new_u[..., None])
        self.slot_pos.scatter_(-1, index, new_pos[..., None])
        rows = take[..., None, None]
        d_index = index[..., None].expand(-1, -1, -1, k.shape[-1])
        self.slot_k.scatter_(2, d_index, torch.where(rows, k[..., None, :], self.slot_k.gather(2, d_index)))
        self.slot_v.scatter_(2, d_index, torch.where(rows, v[..., None, :], self.slot_v.gather(2, d_index)))

    @torch.no_grad()
    def step(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, gate: str = "kv",
             scale: float | None = None) -> Tensor:
        """Decode one token: q [B, Hq, D], k, v [B, H, D], scores [B, H] -> output [B, Hq, D]."""
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        t, w = self.position, self.window
        if w == 0:
            self._admit(k, v, scores, t)              # with no window the new token is a candidate at once
        elif t >= w:
            ring = t % w                              # the token at t - w leaves the window
            self._admit(self.window_k[:, :, ring], self.window_v[:, :, ring], self.window_u[:, :, ring], t - w)
        if w:
            self.window_k[:, :, t % w], self.window_v[:, :, t % w] = k, v
            self.window_u[:, :, t % w] = scores.float()
        self.position += 1

        n_cand = self.n_candidates
        if self.topk and n_cand > self.topk:
            k_t = torch.full(self.kept_u.shape[:-1], float(self.topk), dtype=torch.float64, device=q.device)
            tau = _threshold_last(self.kept_u, k_t)                                           # [B, H] float64
        else:
            tau = torch.full(scores.shape, -torch.inf, dtype=torch.float64, device=q.device)
        self._prune()

        n_win = min(w, self.position)
        keys = torch.cat([self.window_k[:, :, :n_win], self.slot_k], dim=2)                   # [B, H, n_win + k, D]
        values = torch.cat([self.window_v[:, :, :n_win], self.slot_v], dim=2)
        cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        gap = (self.slot_u.double() - tau[..., None]).clamp(0, 1).to(cdtype)
        weight = torch.cat([torch.ones_like(self.window_u[:, :, :n_win], dtype=cdtype), gap], dim=-1)  # m: [B, H, n]
        attended = torch.cat([torch.ones_like(self.window_u[:, :, :n_win], dtype=torch.bool),
                              self.slot_pos >= 0], dim=-1)

        batch, n_q_heads, head_dim = q.shape
        heads = k.shape[1]
        scale = head_dim ** -0.5 if scale is None else scale
        qg = q.view(batch, heads, n_q_heads // heads, head_dim)
        logits = torch.einsum("bhgd,bhnd->bhgn", qg.to(cdtype), keys.to(cdtype)) * scale     # [B, H, G, n]
        m = weight[:, :, None]
        if gate == "kv":
            logits = logits * m
        probs = torch.softmax(logits.masked_fill(~attended[:, :, None], -torch.inf), dim=-1)
        if gate != "none":
            probs = probs * m
        out = torch.einsum("bhgn,bhnd->bhgd", probs, values.to(cdtype))
        return out.reshape(batch, n_q_heads, head_dim).to(q.dtype)
