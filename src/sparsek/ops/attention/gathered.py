"""SparseK attention over gathered keys in PyTorch: SPEC section 3 in O(T * (topk + window)) time and memory.

Shape legend: B batch, T sequence, Hq query heads, Hk KV heads, G = Hq // Hk query heads per KV head,
D head dim, R = B * Hk rows, P queries per block, NB = ceil(T / P) blocks (n of them in one chunk),
K = max(1, min(topk, T)) list slots, L = K + P + min(window, T) - 1 keys per block, NBAD non-finite keys.

The block rule of the fused kernels (SPEC section 3): the queries i0 .. i0 + P - 1 of a block select the K keys
selected at i0 (`block_key_lists`) plus keys that become candidates inside the block, and those lie in the band
of keys i0 - window + 1 .. i0 + P - 1 that also holds every query's window. Each block gathers those L keys
once and attends them with dense, masked products (batched matmuls, not per-query gathers), so a query costs
O(topk + window + P) instead of the reference's O(T).

Three implementations of the same block math:

* native.c (`native.native_sparsek_attention`, with the selection of ops/select/native.c), for float32 (and
  half precision, computed in float32) with finite k and v where a C compiler builds it: one block at a time in
  C, without the PyTorch operations' fixed cost, which dominates short rows.
* `_GatheredAttention`, used otherwise whenever k and v are finite (float64, or no C compiler): forward and
  backward written out (flash-attention's recipe in PyTorch). Short rows keep each chunk's probabilities for
  the backward; past _KEEP_ELEMENTS the forward keeps only the output and the backward recomputes each chunk's
  probabilities, so memory stays O(chunk * L) as with the reference's checkpointing, but with one
  recomputation of the logits instead of a second forward plus a whole autograd graph. Either way the mask is
  applied as one additive bias (0 or -inf) and 0/1 factors built at [R, n, P, L] (shared by the G heads of a
  KV head) rather than by masked_fill / torch.where at logit size, several times slower on a CPU.
* `_attend_blocks` under plain autograd with per-chunk activation checkpointing, for inputs with NaN/inf in k
  or v: those keys are kept out of the dense products, where 0 * NaN would reach every query of the block
  (their list and band entries point to a zero sentinel key, as empty slots do), and attended one (query, key)
  pair at a time with torch.where, so they reach only the queries that attend them, forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..common import compute_dtype
from ..select import prefix_selection
from ..select.blocks import block_key_lists
from . import native

# Queries per block: each query also computes the P - 1 band keys past its window, but a block shares one
# gather of its list and one batched matmul; 16 was fastest on a 2-core CPU (8 to 64 tried, topk = window
# = 16 and 64).
BLOCK = 16
# Elements of one chunk's [R, n, P, G, L] logits; a few times this many bytes are live at once. Small enough
# for the elementwise passes to stay in cache (2^16 to 2^18 alike on a 2-core CPU, 2^20 up to 2x slower).
_CHUNK_ELEMENTS = 1 << 17
# Up to this many logits [R, T, G, L] in all, the forward keeps its chunks (logits, probabilities, gathered k
# and v: about 24 bytes per logit) for the backward rather than recomputing them, which is most of the
# backward's fixed cost on short rows.
_KEEP_ELEMENTS = 1 << 21


def _block_keys(lists: Tensor, q_start: int, block: int, window: int, t_len: int) -> tuple[Tensor, Tensor]:
    """The keys of n blocks of P queries from q_start: lists [R, n, K] int64 (T for an empty slot) ->
    keys [R, n, L] (each block's list, then its band; T where the band starts before 0) and the query
    positions i [n, P]."""
    rows, n_blocks, _ = lists.shape
    first = q_start + block * torch.arange(n_blocks, device=lists.device)                   # [n]
    band_len = block + min(window, t_len) - 1
    band = first[:, None] - min(window, t_len) + 1 + torch.arange(band_len, device=lists.device)  # [n, Lb]
    band = torch.where(band >= 0, band, t_len).expand(rows, n_blocks, band_len)
    i = first[:, None] + torch.arange(block, device=lists.device)                             # [n, P]
    return torch.cat([lists, band], dim=-1), i


def _mask(i: Tensor, j: Tensor, start_j: Tensor, end_j: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(attended, selected) of queries i against keys j: SPEC section 3's sets, broadcast over any shape.
    The sentinel key j = T (start = end = T) is neither."""
    selected = (start_j <= i) & (i < end_j)
    return selected | ((j <= i) & (j > i - window)), selected


def _rows_select(x: Tensor, keys: Tensor) -> Tensor:
    """x [R, T + 1, ...] at keys [R, ...] (positions per row) -> [R, ..., ...x's trailing dims]."""
    rows, n_pos = x.shape[:2]
    flat = (keys + n_pos * torch.arange(rows, device=keys.device).view(-1, *[1] * (keys.dim() - 1))).flatten()
    return x.flatten(0, 1).index_select(0, flat).view(*keys.shape, *x.shape[2:])


class _Chunk:
    """What a chunk of n blocks needs besides q, k and v, in the layout of its logits [R, n, P, G, L]: keys,
    the logit bias (0 or -inf), the weight m and, for the backward, where m has a gradient (free)."""

    def __init__(self, lists: Tensor, q_start: int, block: int, window: int, u_rows: Tensor, tau: Tensor,
                 start_rows: Tensor, end_rows: Tensor, gate: str, dtype: torch.dtype):
        t_len = start_rows.shape[1] - 1
        self.keys, i = _block_keys(lists, q_start, block, window, t_len)                       # [R, n, L]
        i = i.unsqueeze(-1)                                                                    # [n, P, 1]
        attended, selected = _mask(i, self.keys.unsqueeze(2), _rows_select(start_rows, self.keys).unsqueeze(2),
                                   _rows_select(end_rows, self.keys).unsqueeze(2), window)     # [R, n, P, L]
        self.bias = torch.where(attended, 0.0, -torch.inf).to(dtype).unsqueeze(3)              # [R, n, P, 1, L]
        self.weight = self.free = None
        if gate != "none":
            # m_ij = clip(u_j - tau_i, 0, 1) where selected, 1 elsewhere; a tau_i of -inf gives +inf, clipped to 1.
            gap = _rows_select(u_rows, self.keys).unsqueeze(2) - tau.unsqueeze(-1)              # [R, n, P, L]
            chosen = selected.to(gap.dtype)
            self.weight = (1 + chosen * (gap.clamp(0, 1) - 1)).to(dtype).unsqueeze(3)          # [R, n, P, 1, L]
            # The reference's gradient rule: only strictly inside (0, 1).
            self.free = (selected & (gap > 0) & (gap < 1)).to(dtype)                            # [R, n, P, L]


def _chunk_softmax(q, k_rows, v_rows, u_rows, tau, lists, start_rows, end_rows, span, window, gate, scale):
    """The part of a chunk's math that forward and backward share: its _Chunk, q_c [R * n, P * G, D], the
    gathered k_c, v_c [R * n, L, D], the logits and the softmax probabilities [R, n, P, G, L]."""
    rows, _, group, head_dim = q.shape
    q_start, n_blocks, block, first_list = span
    q_end = q_start + n_blocks * block
    c = _Chunk(lists[:, first_list:first_list + n_blocks], q_start, block, window, u_rows,
               tau[:, q_start:q_end].view(rows, n_blocks, block), start_rows, end_rows, gate, q.dtype)
    q_c = q[:, q_start:q_end].reshape(rows * n_blocks, block * group, head_dim)
    k_c, v_c = _rows_select(k_rows, c.keys).flatten(0, 1), _rows_select(v_rows, c.keys).flatten(0, 1)
    logits = torch.bmm(q_c, k_c.transpose(1, 2)).view(rows, n_blocks, block, group, -1)
    z = torch.addcmul(c.bias, logits, c.weight * scale) if gate == "kv" else c.bias.add(logits, alpha=scale)
    return c, q_c, k_c, v_c, logits, torch.softmax(z, dim=-1)


class _GatheredAttention(torch.autograd.Function):
    """Block attention over finite k, v: q [R, T, G, D], k_rows, v_rows [R, T + 1, D] (position T a zero
    sentinel), u_rows [R, T + 1], tau [R, T] -> [R, T, G, D]. The rest (lists [R, NB, K] int64, start_rows,
    end_rows [R, T + 1], spans, window, gate, scale) carries no gradient."""

    @staticmethod
    def forward(ctx, q, k_rows, v_rows, u_rows, tau, lists, start_rows, end_rows, spans, window, gate, scale):
        rows, t_len, group, head_dim = q.shape
        out = torch.empty_like(q)
        # Keep each chunk's softmax for the backward while that stays small; beyond, the backward recomputes it.
        n_keys = lists.shape[-1] + spans[0][2] + min(window, t_len) - 1
        keep = any(ctx.needs_input_grad[:5]) and rows * t_len * group * n_keys <= _KEEP_ELEMENTS
        ctx.chunks = []
        for span in spans:
            q_start, n_blocks, block, _ = span
            q_end = q_start + n_blocks * block
            chunk = _chunk_softmax(q, k_rows, v_rows, u_rows, tau, lists, start_rows, end_rows, span, window, gate,
                                   scale)
            c, _, _, v_c, _, probs = chunk
            if keep:
                ctx.chunks.append(chunk)
            if c.weight is not None:
                probs = probs * c.weight
            out[:, q_start:q_end] = torch.bmm(probs.view(rows * n_blocks, block * group, -1), v_c).view(
                rows, q_end - q_start, group, head_dim)
        ctx.save_for_backward(q, k_rows, v_rows, u_rows, tau, lists, start_rows, end_rows, out)
        ctx.spans, ctx.window, ctx.gate, ctx.scale = spans, window, gate, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_rows, v_rows, u_rows, tau, lists, start_rows, end_rows, out = ctx.saved_tensors
        window, gate, scale = ctx.window, ctx.gate, ctx.scale
        rows, t_len, group, head_dim = q.shape
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k, grad_v = torch.zeros_like(k_rows), torch.zeros_like(v_rows)
        scores_grad = gate != "none" and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        grad_u = torch.zeros(u_rows.shape, dtype=q.dtype, device=q.device) if scores_grad else None
        grad_tau = torch.zeros(tau.shape, dtype=q.dtype, device=q.device) if scores_grad else None
        # delta_i = sum_j p_ij dp_ij = dout_i . out_i (flash-attention): the softmax backward's row term.
        delta = (grad_out * out).sum(-1)                                                       # [R, T, G]
        for n, span in enumerate(ctx.spans):
            q_start, n_blocks, block, _ = span
            q_end = q_start + n_blocks * block
            c, q_c, k_c, v_c, logits, probs = ctx.chunks[n] if ctx.chunks else _chunk_softmax(
                q, k_rows, v_rows, u_rows, tau, lists, start_rows, end_rows, span, window, gate, scale)
            dout_c = grad_out[:, q_start:q_end].reshape(rows * n_blocks, block * group, head_dim)
            shape = (rows, n_blocks, block, group, -1)
            weighted = probs * c.weight if c.weight is not None else probs
            grad_v_c = torch.bmm(weighted.view(rows * n_blocks, block * group, -1).transpose(1, 2), dout_c)
            grad_weighted = torch.bmm(dout_c, v_c.transpose(1, 2)).view(shape)
            grad_probs = grad_weighted * c.weight if c.weight is not None else grad_weighted
            grad_z = probs * (grad_probs - delta[:, q_start:q_end].view(shape[:-1]).unsqueeze(-1))
            grad_logits = grad_z * (c.weight * scale) if gate == "kv" else grad_z * scale
            grad_logits = grad_logits.view(rows * n_blocks, block * group, -1)
            grad_q[:, q_start:q_end] = torch.bmm(grad_logits, k_c).view(rows, q_end - q_start, group, head_dim)
            grad_k_c = torch.bmm(grad_logits.transpose(1, 2), q_c)                             # [R * n, L, D]
            flat_keys = (c.keys + (t_len + 1) * torch.arange(rows, device=q.device).view(-1, 1, 1)).flatten()
            grad_k.view(-1, head_dim).index_add_(0, flat_keys, grad_k_c.view(-1, head_dim))
            grad_v.view(-1, head_dim).index_add_(0, flat_keys, grad_v_c.view(-1, head_dim))
            if scores_grad:
                grad_weight = (grad_weighted * probs).sum(3)                                  # [R, n, P, L]
                if gate == "kv":
                    grad_weight = grad_weight + (grad_z * logits).sum(3) * scale
                grad_gap = grad_weight * c.free
                grad_u.view(-1).index_add_(0, flat_keys, grad_gap.sum(2).flatten())
                grad_tau[:, q_start:q_end] = -grad_gap.sum(-1).view(rows, q_end - q_start)
        if scores_grad:
            grad_u, grad_tau = grad_u.to(u_rows.dtype), grad_tau.to(tau.dtype)
        return grad_q, grad_k, grad_v, grad_u, grad_tau, None, None, None, None, None, None, None


def _attend_blocks(q: Tensor, k_rows: Tensor, v_rows: Tensor, u_rows: Tensor, tau: Tensor, start_rows: Tensor,
                   end_rows: Tensor, lists: Tensor, bad: Tensor, q_start: int, window: int, gate: str,
                   scale: float) -> Tensor:
    """The chunk math under autograd, for inputs with non-finite keys: the n blocks of P queries from q_start.

    q [R, n, P, G, D]; k_rows, v_rows [R, T + 1, D]; u_rows, start_rows, end_rows [R, T + 1]; tau [R, n, P];
    lists [R, n, K] int64; bad [NBAD] int64 positions of non-finite keys -> [R, n, P, G, D].
    """
    rows, n_blocks, block, _, _ = q.shape
    t_len = k_rows.shape[1] - 1
    keys, i = _block_keys(lists, q_start, block, window, t_len)
    keys = torch.where(torch.isin(keys, bad), t_len, keys)                                    # the pair path's
    i = i.view(1, n_blocks, block, 1)                                                          # [1, n, P, 1]
    attended, selected = _mask(i, keys.unsqueeze(2), _rows_select(start_rows, keys).unsqueeze(2),
                               _rows_select(end_rows, keys).unsqueeze(2), window)              # [R, n, P, L]
    seen, selected_bad = _mask(i, bad, start_rows[:, bad].view(rows, 1, 1, -1),
                               end_rows[:, bad].view(rows, 1, 1, -1), window)                  # [R, n, P, NBAD]

    def per_pair(x: Tensor) -> Tensor:  # [R, NBAD, D] -> [R, n, P, 1, NBAD, D], 0 where not attended
        return torch.where(seen[:, :, :, None, :, None], x[:, None, None, None], 0)

    k_bad, v_bad = per_pair(k_rows[:, bad]), per_pair(v_rows[:, bad])
    k_set, v_set = _rows_select(k_rows, keys), _rows_select(v_rows, keys)                     # [R, n, L, D]
    logits = torch.cat([torch.einsum("rnpgd,rnld->rnpgl", q, k_set), (q.unsqueeze(-2) * k_bad).sum(-1)],
                       dim=-1) * scale                                                        # [R, n, P, G, L + NBAD]
    attended = torch.cat([attended, seen], dim=-1).unsqueeze(3)
    weight = None
    if gate != "none":
        u_j = torch.cat([_rows_select(u_rows, keys), u_rows[:, bad].view(rows, 1, -1).expand(-1, n_blocks, -1)], -1)
        gap = u_j.unsqueeze(2) - tau.unsqueeze(-1)
        free = (gap > 0) & (gap < 1)
        gap = torch.where(free, gap, gap.detach().clamp(0, 1))
        weight = torch.where(torch.cat([selected, selected_bad], -1), gap, 1.0).to(q.dtype).unsqueeze(3)
    if gate == "kv":
        logits = logits * weight
    # A NaN logit makes its whole softmax row NaN; zero the columns the row does not attend, or the backward's
    # 0 * NaN would reach their keys.
    probs = torch.where(attended, torch.softmax(logits.masked_fill(~attended, -torch.inf), dim=-1), 0)
    if weight is not None:
        probs = probs * weight
    n_keys = keys.shape[-1]
    out = torch.einsum("rnpgl,rnld->rnpgd", probs[..., :n_keys], v_set)
    return out + (probs[..., n_keys:].unsqueeze(-1) * v_bad).sum(-2)


def sparsek_attention_gathered(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                               gate: str = "kv", scale: float | None = None) -> Tensor:
    """SparseK attention of one padded batch (inputs already validated; see `sparsek_attention`), attending only
    each query block's selected keys and window band: O(T * (topk + window)) time and memory.

    q [B, T, Hq, D], k and v [B, T, Hk, D], scores [B, T, Hk] -> [B, T, Hq, D] in q's dtype.
    Half-precision inputs are computed in float32, float32 and float64 in their own precision. The selection
    runs on the scores in float32, or in float64 when the scores or the inputs are float64, as in
    `sparsek_attention_reference`, which this equals up to rounding (outputs and the gradients of q, k, v and
    scores).
    """
    batch, t_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    rows = batch * n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    cdtype = compute_dtype(q.dtype)
    score_dtype = torch.float64 if torch.float64 in (q.dtype, scores.dtype) else torch.float32

    block = min(BLOCK, t_len)
    if cdtype == torch.float32 == score_dtype and native.available():
        out = native.native_sparsek_attention(q.float(), k.float(), v.float(), scores.float(), topk=topk,
                                              window=window, gate=gate, scale=scale, block=block)
        if out is not None:                                          # else non-finite k or v: the paths below
            return out.to(q.dtype)

    u = scores.to(score_dtype)
    selection = prefix_selection(u, topk, window, backend="auto")
    tau = selection.tau if gate != "none" else selection.tau.detach()

    def by_row(x: Tensor) -> Tensor:  # [B, T, Hk, ...] -> [R, T, ...]
        return x.transpose(1, 2).reshape(rows, t_len, *x.shape[3:])

    def with_sentinel(x: Tensor, value) -> Tensor:  # [R, T, ...] -> [R, T + 1, ...]
        return torch.cat([x, x.new_full((rows, 1, *x.shape[2:]), value)], dim=1)

    k_rows, v_rows = with_sentinel(by_row(k.to(cdtype)), 0), with_sentinel(by_row(v.to(cdtype)), 0)
    bad = (~(torch.isfinite(k_rows) & torch.isfinite(v_rows))).any(-1).any(0).nonzero().squeeze(1)  # [NBAD]
    start, end = by_row(selection.start), by_row(selection.end)
    u_rows, tau_rows = with_sentinel(by_row(u), 0), by_row(tau)
    start_rows, end_rows = with_sentinel(start, t_len), with_sentinel(end, t_len)
    q_rows = by_row(q.to(cdtype).view(batch, t_len, n_kv_heads, group, head_dim))                  # [R, T, G, D]

    lists = block_key_lists(start, end, topk, block, backend="auto").long()                   # [R, NB, K]
    lists = torch.where(lists >= 0, lists, t_len)
    n_keys = lists.shape[-1] + block + min(window, t_len) - 1
    per_chunk = max(1, _CHUNK_ELEMENTS // (rows * group * block * n_keys))
    n_full = t_len // block
    # (first query, blocks, P, first list): full blocks in chunks of per_chunk, then the last partial block on
    # its own (with its own P).
    spans = [(b * block, min(per_chunk, n_full - b), block, b) for b in range(0, n_full, per_chunk)]
    if t_len % block:
        spans.append((n_full * block, 1, t_len % block, n_full))

    if not bad.numel():
        out = _GatheredAttention.apply(q_rows, k_rows, v_rows, u_rows, tau_rows, lists, start_rows, end_rows, spans,
                                       window, gate, scale)                                   # [R, T, G, D]
    else:
        use_checkpoint = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, scores))
        parts = []
        for q_start, n_blocks, size, first_list in spans:
            q_end = q_start + n_blocks * size
            args = (q_rows[:, q_start:q_end].view(rows, n_blocks, size, group, head_dim), k_rows, v_rows, u_rows,
                    tau_rows[:, q_start:q_end].view(rows, n_blocks, size), start_rows, end_rows,
                    lists[:, first_list:first_list + n_blocks], bad, q_start, window, gate, scale)
            part = checkpoint(_attend_blocks, *args, use_reentrant=False) if use_checkpoint else _attend_blocks(*args)
            parts.append(part.reshape(rows, q_end - q_start, group, head_dim))
        out = torch.cat(parts, dim=1)
    out = out.view(batch, n_kv_heads, t_len, n_q_heads // n_kv_heads, head_dim).transpose(1, 2)
    return out.reshape(batch, t_len, n_q_heads, head_dim).to(q.dtype)
