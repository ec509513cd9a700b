"""What every op folder shares: the names of gates and backends, when a Triton kernel can run, the dtype the
PyTorch paths compute in, and one validator per setting that the entry points take (topk and window, gate,
scale, backend, q/k/v). No op folder defines these for another; each imports them from here."""

from __future__ import annotations

import os

import torch
from torch import Tensor

GATES = ("kv", "v", "none")
GATE_IDS = {"kv": 0, "v": 1, "none": 2}       # how the kernels receive the gate
# "auto" is the fastest exact path for the tensors' device: Triton on CUDA; on the CPU the gathered path for long
# rows (attention only, `ops.attention.interface.gather_is_cheaper`), else the reference.
BACKENDS = ("auto", "triton", "gather", "reference")
# The selection's own backends (`prefix_selection`): "native" is its C twin for the CPU (ops/select/native.c).
SELECTION_BACKENDS = ("auto", "triton", "native", "reference")
LOG2E = 1.4426950408889634                     # the kernels use exp2: exp(x) = exp2(x * LOG2E)


def interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1, as in the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the PyTorch paths compute in: float32 for half precision (which cannot resolve tau between close
    scores), else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def supports(q: Tensor) -> bool:
    """Whether the fused kernels can run on q (device, dtype, head dim); float64 goes to the reference."""
    head_dim = q.shape[-1]
    on_device = q.is_cuda or (interpreting() and q.device.type == "cpu")
    kernel_dtype = q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return on_device and kernel_dtype and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 256


def kernel_for(backend: str, module, name: str, q: Tensor):
    """The Triton kernel module.name when `backend` picks it for q, else None (the caller's PyTorch path).

    "triton" (and "gluon", the attention's fused path with its Gluon forward) picks it always, and raises
    ValueError where it cannot run (triton missing: module is None; or q unsupported, see `supports`); "auto"
    picks it for CUDA tensors it supports (the CPU interpreter only on request); "reference" and "gather"
    never do.
    """
    forced = backend in ("triton", "gluon")
    if not (forced or (backend == "auto" and q.is_cuda)):
        return None
    if module is None:
        if forced:
            raise ValueError(f"backend={backend!r} needs the triton package: pip install 'sparsek[triton]'")
        return None
    if not supports(q):
        if forced:
            raise ValueError(f"backend={backend!r} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1) in "
                             "float16, bfloat16 or float32 and a power-of-two head dim in [16, 256], got "
                             f"{q.device}, {q.dtype} and D={q.shape[-1]}")
        return None
    return getattr(module, name)


def check_budget(topk, window, *, allow_empty: bool = False) -> None:
    """ValueError naming the argument unless topk and window are ints >= 0 (bool is not an int here), and,
    unless allow_empty, not both 0."""
    for name, value in (("topk", topk), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not allow_empty and topk + window == 0:
        raise ValueError("topk and window must be not both 0 (every query would attend to nothing)")


def check_sinks(sinks, topk: int) -> None:
    """ValueError unless sinks (the first positions with a scorer bias of their own) is an int in [0, topk]."""
    if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks <= topk:
        raise ValueError(f"sinks must be an int in [0, topk] = [0, {topk}], got {sinks!r}")


def check_gate(gate) -> None:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not 0 < scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def check_backend(backend, choices: tuple[str, ...] = BACKENDS) -> None:
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """ValueError unless q [B, T, Hq, D] and k, v [B, T, Hk, D] are tensors of one floating dtype and device with
    Hq a multiple of Hk (every attention entry point, the baselines included)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
    batch, t_len, n_q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[1] != t_len or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [B, T, H_kv, D] = [{batch}, {t_len}, H_kv, {head_dim}] "
                         f"to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if head_dim == 0:
        raise ValueError(f"the head dim D must be >= 1, got q {tuple(q.shape)}")
    n_kv_heads = k.shape[2]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of KV heads ({n_kv_heads})")
    if not q.is_floating_point() or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
