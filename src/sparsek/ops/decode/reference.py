"""Reference single-token decode attention over a SparseK KV cache, in PyTorch (any float dtype, CPU or GPU).

Shape legend: B batch, Hq query heads, H KV heads, G = Hq // H query heads per KV head, N cache entries
(window + top-k slots, in any order), D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import compute_dtype


def decode_attention_reference(q: Tensor, keys: Tensor, values: Tensor, weight: Tensor, attended: Tensor,
                               gate: str = "kv", scale: float | None = None, *, upcast: bool = True) -> Tensor:
    """Attention of one query token per row over its cache (inputs already validated; see `decode_attention`).

    q [B, Hq, D], keys and values [B, H, N, D], weight [B, H, N] (the mask m), attended [B, H, N] bool
    -> [B, Hq, D] in q's dtype; a row with no attended entry gives 0. Half-precision inputs are computed in
    float32 unless upcast=False (the error of plain half-precision PyTorch, the yardstick for the kernel).
    """
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    cdtype = compute_dtype(q.dtype) if upcast else q.dtype

    q_c = q.to(cdtype).reshape(batch, n_kv_heads, n_q_heads // n_kv_heads, head_dim)    # [B, H, G, D]
    logits = torch.einsum("bhgd,bhnd->bhgn", q_c, keys.to(cdtype)) * scale               # [B, H, G, N]
    m = weight.to(cdtype)[:, :, None]                                                    # [B, H, 1, N]
    mask = attended[:, :, None]                                                          # [B, H, 1, N]
    if gate == "kv":
        logits = logits * m
    probs = torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)    # an empty row is all NaN after the softmax
    if gate != "none":
        probs = probs * m
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values.to(cdtype))
    return out.reshape(batch, n_q_heads, head_dim).to(q.dtype)
