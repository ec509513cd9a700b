"""Public entry point of decode attention: validates inputs, picks the Triton kernel or the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import check_backend, check_gate, check_scale, kernel_for
from .reference import decode_attention_reference

try:
    from . import fused
except ImportError:  # triton is an optional extra
    fused = None


def _validate(q, keys, values, weight, attended, gate, scale, backend) -> None:
    layouts = (("q", q, "[B, Hq, D]"), ("keys", keys, "[B, H, N, D]"), ("values", values, "[B, H, N, D]"),
               ("weight", weight, "[B, H, N]"), ("attended", attended, "[B, H, N]"))
    for name, x, layout in layouts:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != layout.count(",") + 1:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    batch, n_q_heads, head_dim = q.shape
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    if keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys and values must be [B, H, N, D] = [{batch}, H, N, {head_dim}] to match q "
                         f"{tuple(q.shape)}, got {tuple(keys.shape)}")
    n_kv_heads = keys.shape[1]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of KV heads ({n_kv_heads})")
    for name, x in (("weight", weight), ("attended", attended)):
        if x.shape != keys.shape[:3]:
            raise ValueError(f"{name} must be [B, H, N] = {tuple(keys.shape[:3])}, got {tuple(x.shape)}")
    if not q.is_floating_point() or q.dtype != keys.dtype or q.dtype != values.dtype:
        raise ValueError(f"q, keys, values must share one floating dtype, got {q.dtype}, {keys.dtype}, "
                         f"{values.dtype}")
    if weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"weight must be float32 (float64 for a float64 cache), got {weight.dtype}")
    if attended.dtype != torch.bool:
        raise ValueError(f"attended must be bool, got {attended.dtype}")
    devices = [x.device for x in (q, keys, values, weight, attended)]
    if any(d != devices[0] for d in devices):
        raise ValueError(f"q, keys, values, weight, attended must be on one device, got {', '.join(map(str, devices))}")
    check_gate(gate)
    check_scale(scale)
    check_backend(backend)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, weight: Tensor, attended: Tensor, *,
                     gate: str = "kv", scale: float | None = None, backend: str = "auto") -> Tensor:
    """Attention of one new token per batch row over a SparseK KV cache (window plus top-k slots).

    Query head h attends to the attended entries n of KV head h // (Hq // H) with the SparseK mask m_n:
    logits scale * q.k_n (times m_n for gate "kv"), a softmax over the attended entries, probabilities times
    m_n (gates "kv" and "v"), out = sum_n p_n v_n.

    Args:
        q: [B, Hq, D] queries of the new token.
        keys, values: [B, H, N, D] cache entries, in any order; Hq must be a multiple of H.
        weight: [B, H, N] float32 (float64 for a float64 cache) mask m in [0, 1]: 1 in the window,
            clip(u - tau, 0, 1) in the selected slots (`SparseKCache.weights`).
        attended: [B, H, N] bool, which entries hold a token; a row with none gives 0.
        gate: "kv" (default), "v" or "none", as in `sparsek_attention`.
        scale: softmax scale, default D ** -0.5.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1; float16, bfloat16, float32 and a power-of-two
            D in [16, 256]), "reference" (PyTorch, any float dtype) or "auto" (triton for supported CUDA
            tensors, else the reference).

    Returns:
        [B, Hq, D] in q's dtype, accumulated in float32 (float64 for float64 inputs). No gradient path through
        the kernel: decoding runs under no_grad.
    """
    _validate(q, keys, values, weight, attended, gate, scale, backend)
    attention = kernel_for(backend, fused, "decode_attention_triton", q) or decode_attention_reference
    return attention(q, keys, values, weight, attended, gate=gate, scale=scale)
