"""Earlier sparse-attention patterns that SparseK is compared against: dense, sliding window, fixed, LSH (hash).

Shapes (all functions are causal: query i only ever sees keys j <= i):

    B  batch          T  sequence length      D  head dim
    Hq query heads    Hk KV heads (Hq % Hk == 0; query head h reads KV head h // (Hq // Hk), grouped-query)
    q [B, T, Hq, D]   k, v [B, T, Hk, D]      output [B, T, Hq, D] in q's dtype

Window and fixed attention run through flex_attention (compiled once, block masks cached) on CUDA and through
dense SDPA with a boolean [T, T] mask elsewhere. Hash attention gathers tokens into sorted chunks and runs the same
O(T * chunk) code on every device. Logits and softmax are float32 at least (float64 inputs stay float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ..ops.common import check_qkv, check_scale

# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def _check_budget(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be an int > 0, got {value!r}")


def _validate(q: Tensor, k: Tensor, v: Tensor, scale) -> None:
    check_qkv(q, k, v)
    check_scale(scale)


def _validate_rotations(k: Tensor, rotations: Tensor) -> None:
    if not isinstance(rotations, Tensor) or rotations.dim() != 3:
        shape = tuple(rotations.shape) if isinstance(rotations, Tensor) else type(rotations).__name__
        raise ValueError(f"rotations must be a [Hk, D, R] tensor, got {shape}")
    n_kv_heads, head_dim = k.shape[2], k.shape[3]
    if rotations.shape[0] != n_kv_heads or rotations.shape[1] != head_dim or rotations.shape[2] == 0:
        raise ValueError(f"rotations must be [Hk, D, R] = [{n_kv_heads}, {head_dim}, R >= 1] to match k "
                         f"{tuple(k.shape)}, got {tuple(rotations.shape)}")
    if not rotations.is_floating_point():
        raise ValueError(f"rotations must be a floating tensor, got {rotations.dtype}")
    if rotations.device != k.device:
        raise ValueError(f"rotations must be on k's device {k.device}, got {rotations.device}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that logits and softmax are computed in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# patterns: one mask_mod each, shared by flex_attention (tensors of indices) and the dense mask helpers
# ----------------------------------------------------------------------------------------------------------


def _window_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


def _fixed_mod(local: int, stride: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < local) | (kv_idx % stride == stride - 1))

    return mask_mod


def _fixed_summary_mod(local: int, stride: int, t_len: int):
    """The fixed pattern over [T keys; T // stride summary keys], for flex_attention on CUDA.

    KV index t_len + s holds the summary column c = s * stride + stride - 1. Summary columns spread over every
    128-key block would leave flex no block to skip; gathered after the keys they fill T / (128 * stride) blocks
    per query row. A column inside the query's local band is attended there, not twice.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        column = (kv_idx - t_len) * stride + stride - 1
        band = (kv_idx < t_len) & (kv_idx <= q_idx) & (q_idx - kv_idx < local)
        summary = (kv_idx >= t_len) & (column <= q_idx) & (q_idx - column >= local)
        return band | summary

    return mask_mod


def _dense_mask(mask_mod, t_len: int, device) -> Tensor:
    positions = torch.arange(t_len, device=device)
    return mask_mod(None, None, positions[:, None], positions[None, :])


def window_mask(T: int, window: int, device: torch.device | str | None = None) -> Tensor:  # noqa: N803
    """[T, T] bool, True where query i attends key j: i - window < j <= i. Small T only (O(T^2) memory)."""
    _check_budget("window", window)
    return _dense_mask(_window_mod(window), T, device)


def fixed_mask(T: int, local: int, stride: int, device: torch.device | str | None = None) -> Tensor:  # noqa: N803
    """[T, T] bool of the fixed pattern: j <= i and (i - local < j or j % stride == stride - 1). Small T only."""
    _check_budget("local", local)
    _check_budget("stride", stride)
    return _dense_mask(_fixed_mod(local, stride), T, device)


# ----------------------------------------------------------------------------------------------------------
# dense SDPA (CPU, and full attention everywhere) and flex_attention (CUDA)
# ----------------------------------------------------------------------------------------------------------


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Causal SDPA on [B, T, H, D] tensors; mask [T, T] bool (True = attend) or None for plain causal."""
    work = q.dtype
    if not q.is_cuda:  # CPU kernels may keep half-precision logits; the fused CUDA ones accumulate in float32
        work = torch.promote_types(q.dtype, torch.float32)
    q_, k_, v_ = (x.to(work).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).to(q.dtype)


_compiled_flex = None
_BLOCK_MASKS: dict[tuple, BlockMask] = {}
_MAX_BLOCK_MASKS = 32
_FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_RECOMPILE_LIMIT = 64


def _block_mask(pattern: str, params: tuple[int, ...], mask_mod, q_len: int, kv_len: int,
                device: torch.device) -> BlockMask:
    """The BlockMask of a pattern for one length and device, built once and kept (oldest dropped past 32)."""
    key = (pattern, params, q_len, kv_len, str(device))
    block_mask = _BLOCK_MASKS.get(key)
    if block_mask is None:
        if len(_BLOCK_MASKS) >= _MAX_BLOCK_MASKS:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        # B = H = None: one mask broadcast over batch rows and heads
        block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)
        _BLOCK_MASKS[key] = block_mask
    return block_mask


def _flex(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask: BlockMask) -> Tensor:
    """Compiled flex_attention on [B, T, H, D] tensors (q's T may differ from k's), output [B, Tq, Hq, D]."""
    global _compiled_flex
    if _compiled_flex is None:  # compiled on first CUDA use only: CPU runs never touch the compiler
        _compiled_flex = torch.compile(flex_attention, dynamic=False)

    def attend():
        return _compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                              scale=scale, enable_gqa=q.shape[2] != k.shape[2],
                              # under 128 queries flex picks its decoding kernel, which fails to lower for some
                              # shapes (torch 2.11, T = 77); training never needs it
                              kernel_options={"FORCE_USE_FLEX_ATTENTION": True})  # [B, Hq, T, D]

    if torch.compiler.is_compiling():  # inside the caller's compiled graph: its own limits apply
        out = attend()
    else:
        from torch._dynamo import config as dynamo_config

        # One kernel per (pattern, parameters, T, dtype): past dynamo's default of 8 a sweep would silently fall
        # back to eager flex_attention, which materializes the [T, T] scores.
        limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
        with dynamo_config.patch(recompile_limit=limit):
            out = attend()
    return out.transpose(1, 2)


def _use_flex(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in _FLEX_DTYPES


# ----------------------------------------------------------------------------------------------------------
# public attention functions
# ----------------------------------------------------------------------------------------------------------


def full_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Dense causal attention (scaled_dot_product_attention; GQA inside it).

    Args:
        q: [B, T, Hq, D] queries.
        k, v: [B, T, Hk, D] keys and values; Hq a multiple of Hk (query head h uses KV head h // (Hq // Hk)).
        scale: softmax scale, default D ** -0.5.

    Returns:
        [B, T, Hq, D] in q's dtype.
    """
    _validate(q, k, v, scale)
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    return _sdpa(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, None)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None) -> Tensor:
    """Causal sliding-window attention: query i attends keys i - window < j <= i (at most `window` keys).

    Args:
        q: [B, T, Hq, D] queries.
        k, v: [B, T, Hk, D] keys and values; Hq a multiple of Hk.
        window: keys per query (> 0), the query's own included; window >= T is full causal attention.
        scale: softmax scale, default D ** -0.5.

    Returns:
        [B, T, Hq, D] in q's dtype. On CUDA (float16, bfloat16, float32) through compiled flex_attention.
    """
    _validate(q, k, v, scale)
    _check_budget("window", window)
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t_len = q.shape[1]
    if _use_flex(q):
        return _flex(q, k, v, scale, _block_mask("window", (window,), _window_mod(window), t_len, t_len, q.device))
    return _sdpa(q, k, v, scale, window_mask(t_len, window, q.device))


def fixed_attention(q: Tensor, k: Tensor, v: Tensor, local: int, stride: int, scale: float | None = None) -> Tensor:
    """The "fixed" pattern of the Sparse Transformer (Child et al. 2019), causal.

    Query i attends keys j <= i that lie in its local band (i - local < j) or are summary columns
    (j % stride == stride - 1): at most local + ceil((i + 1) / stride) keys.

    Args:
        q: [B, T, Hq, D] queries.
        k, v: [B, T, Hk, D] keys and values; Hq a multiple of Hk.
        local: width of the local band (> 0), the query's own key included.
        stride: period of the summary columns (> 0); stride 1 is full causal attention.
        scale: softmax scale, default D ** -0.5.

    Returns:
        [B, T, Hq, D] in q's dtype. On CUDA (float16, bfloat16, float32) through compiled flex_attention over
        the keys followed by copies of the summary columns, so that flex can skip the blocks between them.
    """
    _validate(q, k, v, scale)
    _check_budget("local", local)
    _check_budget("stride", stride)
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t_len = q.shape[1]
    if _use_flex(q):
        k_all = torch.cat([k, k[:, stride - 1::stride]], dim=1)                   # [B, T + T // stride, Hk, D]
        v_all = torch.cat([v, v[:, stride - 1::stride]], dim=1)
        mask_mod = _fixed_summary_mod(local, stride, t_len)
        return _flex(q, k_all, v_all, scale,
                     _block_mask("fixed", (local, stride), mask_mod, t_len, k_all.shape[1], q.device))
    return _sdpa(q, k, v, scale, fixed_mask(t_len, local, stride, q.device))


# ----------------------------------------------------------------------------------------------------------
# LSH (hash) attention
# ----------------------------------------------------------------------------------------------------------


def _hash_order(k: Tensor, rotations: Tensor) -> Tensor:
    """[B, Hk, T] int64: token positions sorted by (bucket, position); buckets from the normalized keys."""
    t_len = k.shape[1]
    unit = F.normalize(k.detach().float(), dim=-1)                                   # [B, T, Hk, D]
    projected = torch.einsum("bthd,hdr->bhtr", unit, rotations.detach().float())     # [B, Hk, T, R]
    buckets = torch.cat([projected, -projected], dim=-1).argmax(dim=-1)              # [B, Hk, T] in [0, 2R)
    positions = torch.arange(t_len, device=k.device)
    return torch.argsort(buckets * t_len + positions, dim=-1)  # keys are distinct, so the order is stable


def _inverse_permutation(order: Tensor) -> Tensor:
    """rank[..., t] = where token t sits in order[..., :] (order is a permutation along the last dim)."""
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def hash_mask(k: Tensor, rotations: Tensor, chunk: int) -> Tensor:
    """[B, Hk, T, T] bool, True where query i attends key j in `hash_attention`. Small T only.

    Args:
        k: [B, T, Hk, D] keys (they alone choose the buckets).
        rotations: [Hk, D, R] random projections (2R buckets).
        chunk: tokens per chunk of the sorted sequence (> 0).
    """
    if not isinstance(k, Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [B, T, Hk, D] tensor, got {tuple(k.shape) if isinstance(k, Tensor) else k}")
    _validate_rotations(k, rotations)
    _check_budget("chunk", chunk)
    t_len = k.shape[1]
    chunk_of = _inverse_permutation(_hash_order(k, rotations)) // chunk            # [B, Hk, T]
    query_chunk, key_chunk = chunk_of[..., :, None], chunk_of[..., None, :]        # [B, Hk, T, 1], [B, Hk, 1, T]
    near = (key_chunk == query_chunk) | (key_chunk == query_chunk - 1)
    causal = torch.ones(t_len, t_len, dtype=torch.bool, device=k.device).tril()
    return near & causal


def hash_attention(q: Tensor, k: Tensor, v: Tensor, rotations: Tensor, chunk: int,
                   scale: float | None = None) -> Tensor:
    """Reformer-style LSH attention (Kitaev et al. 2020), causal, in O(T * chunk) time and memory.

    Per batch row and KV head, token t gets bucket argmax(concat(u_t R, -u_t R)) with u_t = k_t / |k_t| (float32,
    no gradient). Tokens are sorted by (bucket, position) and the sorted sequence is cut into chunks of `chunk`
    tokens (the last one padded); the query of a token (all query heads of its group) attends to the keys of its
    own chunk and of the previous chunk (none before the first) at positions <= its own, so always to itself.

    Args:
        q: [B, T, Hq, D] queries.
        k, v: [B, T, Hk, D] keys and values; Hq a multiple of Hk (query head h uses KV head h // (Hq // Hk)).
        rotations: [Hk, D, R] fixed random projections (a buffer of the caller), 2R buckets.
        chunk: tokens per chunk (> 0): each query sees at most 2 * chunk keys; chunk >= T is full causal attention.
        scale: softmax scale, default D ** -0.5.

    Returns:
        [B, T, Hq, D] in q's dtype. Gradients reach q, k, v through the gathers, not the bucket choice.
    """
    _validate(q, k, v, scale)
    _validate_rotations(k, rotations)
    _check_budget("chunk", chunk)
    batch, t_len, n_q_heads, head_dim = q.shape
    if t_len == 0:
        return q.new_zeros(q.shape)
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    n_chunks = math.ceil(t_len / chunk)
    padded = n_chunks * chunk

    order = _hash_order(k, rotations)                                              # [B, Hk, T]
    # Padding slots carry position T: later than every real query, so no real query attends to them.
    query_pos = F.pad(order, (0, padded - t_len), value=t_len)                     # [B, Hk, P]
    chunk_pos = query_pos.view(batch, n_kv_heads, n_chunks, chunk)                  # [B, Hk, n, c]
    previous_pos = F.pad(chunk_pos[:, :, :-1], (0, 0, 1, 0), value=t_len)         # [B, Hk, n, c]; none before 0
    key_pos = torch.cat([previous_pos, chunk_pos], dim=-1)                         # [B, Hk, n, 2c]

    work = _work_dtype(q.dtype)
    q_heads = q.to(work).reshape(batch, t_len, n_kv_heads, group * head_dim).transpose(1, 2)  # [B, Hk, T, g*D]
    k_heads = k.to(work).transpose(1, 2)                                           # [B, Hk, T, D]
    v_heads = v.to(work).transpose(1, 2)                                           # [B, Hk, T, D]

    def gather(x: Tensor, positions: Tensor) -> Tensor:                            # [B, Hk, T, E] -> [B, Hk, N, E]
        index = positions.clamp(max=t_len - 1).reshape(batch, n_kv_heads, -1, 1)
        return x.gather(2, index.expand(-1, -1, -1, x.shape[-1]))

    q_blocks = gather(q_heads, query_pos).view(batch, n_kv_heads, n_chunks, chunk, group, head_dim)
    q_blocks = q_blocks.permute(0, 1, 2, 4, 3, 5)                                  # [B, Hk, n, g, c, D]
    k_blocks = gather(k_heads, key_pos).view(batch, n_kv_heads, n_chunks, 1, 2 * chunk, head_dim)
    v_blocks = gather(v_heads, key_pos).view(batch, n_kv_heads, n_chunks, 1, 2 * chunk, head_dim)

    logits = (q_blocks @ k_blocks.transpose(-1, -2)) * scale                       # [B, Hk, n, g, c, 2c]
    allowed = key_pos[:, :, :, None, None, :] <= chunk_pos[:, :, :, None, :, None]  # [B, Hk, n, 1, c, 2c]
    # Every row has a key: a real query sees itself, a padding query (position T) sees every key.
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = probs @ v_blocks                                                         # [B, Hk, n, g, c, D]

    out = out.permute(0, 1, 2, 4, 3, 5).reshape(batch, n_kv_heads, padded, group * head_dim)[:, :, :t_len]
    rank = _inverse_permutation(order)                                             # [B, Hk, T]
    out = gather(out, rank)                                                        # [B, Hk, T, g*D], token order
    return out.transpose(1, 2).reshape(batch, t_len, n_q_heads, head_dim).to(q.dtype)
