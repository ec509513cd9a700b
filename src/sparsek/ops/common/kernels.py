"""Triton helpers that more than one op folder's kernels use (imported only where triton is installed)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_tile(acc, m_i, l_i, q, kt, vt, weight, allowed, qk_scale2, GATE: tl.constexpr, DOT: tl.constexpr,
                 MASKED: tl.constexpr):
    """One online-softmax step over a tile of keys; qk_scale2 = scale * log2(e). MASKED False: every pair
    attends with weight 1 (a tile inside every query's window; weight and allowed are then None)."""
    qk = tl.dot(q, tl.trans(kt), input_precision=DOT)
    qk_scale2 = tl.cast(qk_scale2, tl.float32)          # inductor passes a Python float as fp64
    if MASKED and GATE == 0:
        s = qk * (weight * qk_scale2)
    else:
        s = qk * qk_scale2
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED and GATE != 2:
        p = p * weight
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT)
    return acc, m_new, l_i
