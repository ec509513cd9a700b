"""Fused SparseK attention against causal SDPA, FlexAttention and FLA's NSA on one GPU: time, TFLOP/s, peak memory.

    python -m sparsek.bench.attention                          # T = 4k .. 128k, heads 16/16, 32/8, 64/4
    python -m sparsek.bench.attention --quick                  # T = 4k and 8k only (smoke test)
    python -m sparsek.bench.attention --heads 16/16 --seq-lens 8192 65536 --no-flex

The default run took about 6-7 minutes on an H100 with two head configs, most of it compiling FlexAttention per
shape; the third (64/4, for NSA) adds to that.
Setup: B = 1, D = 128, bf16, topk = 1024, window = 512, gate "kv", scores = torch.randn(B, T, Hk) in float32
(i.i.d. random, no position slope), seed 0. Each time is the median of triton.testing.do_bench (CUDA events,
L2 cache flushed before each call, --rep ms of repeats).

* sparsek: `sparsek_attention_fused`, forward under no_grad, and forward+backward (q, k, v and the scores
  require grad; o.backward with a fixed random output gradient).
* selection: thresholds, key ranges and block-128 key lists, what the fused forward runs before its kernel. The
  share is selection ms / sparsek forward+backward ms. The backward reuses the lists; its threshold backward
  is inside the fwd+bwd time but not in the numerator.
* sdpa: F.scaled_dot_product_attention(is_causal=True) on [B, H, T, D] with GQA through enable_gqa=True (k
  and v repeated to Hq heads beforehand for a backend that refuses it, shown as "+repeat"). The cuDNN and
  FlashAttention backends are timed separately; the fastest one is reported, per forward and per fwd+bwd.
* flex: torch.compile(flex_attention) with the hard SparseK+window mask of the same scores (the gate's soft
  weights aside): allowed(b, h, i, j) = (i - window < j <= i) | (start_j <= i < end_j), on KV head h // G.
  The block mask is built from the selection ranges without evaluating the T x T mask (--flex-mask ranges;
  create_block_mask compiled is --flex-mask create) and is not timed. Up to --flex-max-len only. At the
  smallest T its forward is checked against SDPA with the same mask as a dense boolean tensor.
* nsa: FLA's Native Sparse Attention (`fla.ops.nsa.parallel_nsa`, `pip install fla-core`) at the same keys
  per query: its compression branch picks topk / 64 blocks of 64 keys, and FLA's Triton sliding-window
  attention (`fla.ops.attn.parallel.parallel_attn`) adds the window, each branch gated as NSA combines them
  (gates random in (0, 1), with gradients). Only when fla imports and the GQA group is a power of 2 of at
  least 16, which NSA's kernels need (the 64/4 rows); "-" otherwise, with the reason printed.
* TFLOP/s: forward 4 * B * T * (topk + window) * D * Hq FLOPs, the nominal budget (queries before
  topk + window attend fewer keys); forward+backward 3.5 times that (the backward counted as 2.5 forwards).
* peak MB: torch.cuda.max_memory_allocated during one forward+backward minus what was allocated before it
  (inputs, output gradient, other methods' inputs), so it includes the input gradients.

Before timing a head config, its smallest T runs one forward+backward and warns if anything is NaN or inf.
Writes <out>/results.json (one dict per row, rewritten after every row) and <out>/attention.png; the table
is printed last.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from sparsek.ops.attention.fused import forward_selection, sparsek_attention_fused
from sparsek.ops.common import tiles

DEFAULT_SEQ_LENS = [4096, 8192, 16384, 32768, 65536, 131072]
QUICK_SEQ_LENS = [4096, 8192]
FLEX_BLOCK = 128           # FlexAttention's default sparse block size
FWDBWD_FLOP_FACTOR = 2.5   # forward + backward FLOPs per forward FLOP, as the kernel issue counts them
SDPA_BACKENDS = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
CHECK_MAX_ELEMENTS = 1 << 30  # largest B * Hq * T * T for the dense-mask check of the flex baseline
NSA_BLOCK = 64                # keys per selected block of NSA (its paper's and FLA's default)
NSA_MIN_GROUP = 16            # NSA's kernels tile the query heads of a KV head: a power of 2, at least 16


# ----------------------------------------------------------------------------------------------------------
# timing


def bench(fn, args, grads: list[Tensor] | None = None) -> float:
    """Median ms of fn; grads get .grad = None before every timed call."""
    return triton.testing.do_bench(fn, warmup=25, rep=args.rep, grad_to_none=grads, return_mode="median")


def bench_forward(attn, args) -> float:
    with torch.no_grad():
        return bench(attn, args)


def bench_forward_backward(attn, grad: Tensor, inputs: list[Tensor], args) -> tuple[float, float]:
    """(median ms, peak MB) of attn().backward(grad)."""

    def step():
        attn().backward(grad)

    ms = bench(step, args, grads=inputs)
    return ms, peak_mb(step, inputs)


def peak_mb(fn, inputs: list[Tensor]) -> float:
    """Peak memory allocated by one call of fn above what was allocated before it, in MiB."""
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for x in inputs:
        x.grad = None
    return peak / 2**20


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:150] if text else ''}"


# ----------------------------------------------------------------------------------------------------------
# sparsek


def selection(scores: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """What the fused forward runs before its kernel: ranges, then block-128 key lists -> start, end, lists.

    scores [B, T, Hk] -> start, end [B * Hk, T] int32 (key j is selected by queries start_j <= i < end_j).
    """
    batch, t_len, n_kv_heads = scores.shape
    u = scores.detach().permute(0, 2, 1).reshape(batch * n_kv_heads, t_len).float()
    block = tiles.forward(tiles.target(u.device), 128)["BLOCK_M"]   # query block of the fused forward's key lists
    _, start, end, lists, _ = forward_selection((u.contiguous(),), (topk, window, block))
    return start, end, lists


def bench_sparsek(q, k, v, scores, grad, args, label: str, check: bool) -> dict:
    def attn():
        return sparsek_attention_fused(q, k, v, scores, topk=args.topk, window=args.window, gate=args.gate)

    inputs = [q, k, v, scores]
    if check:
        o = attn()
        o.backward(grad)
        bad = [name for name, x in zip(("output", "dq", "dk", "dv", "dscores"), [o] + [x.grad for x in inputs])
               if x is not None and not torch.isfinite(x).all()]
        for x in inputs:
            x.grad = None
        if bad:
            print(f"{label} WARNING: sparsek has NaN or inf in {', '.join(bad)}", flush=True)
        else:
            print(f"{label} check: sparsek output and gradients are finite", flush=True)

    fwd = bench_forward(attn, args)
    fwdbwd, peak = bench_forward_backward(attn, grad, inputs, args)
    sel = bench(lambda: selection(scores, args.topk, args.window), args)
    print(f"{label} sparsek  fwd {fwd:8.3f} ms  f+b {fwdbwd:8.3f} ms  selection {sel:7.3f} ms  "
          f"peak {peak:8.0f} MB", flush=True)
    return dict(sparsek_fwd_ms=fwd, sparsek_fwdbwd_ms=fwdbwd, selection_ms=sel, sparsek_peak_mb=peak)


# ----------------------------------------------------------------------------------------------------------
# SDPA


def sdpa_inputs(k: Tensor, v: Tensor, group: int):
    """(name suffix, k, v, enable_gqa): GQA inside SDPA first, then k and v repeated to the query heads."""
    if group == 1:
        yield "", k, v, False
        return
    yield "", k, v, True

    def repeat(x: Tensor) -> Tensor:
        return x.detach().repeat_interleave(group, dim=1).requires_grad_()

    yield "+repeat", repeat(k), repeat(v), False


def bench_sdpa(q, k, v, grad, args, label: str) -> dict:
    """Causal SDPA on [B, H, T, D] per backend; the fastest backend per mode is reported as "sdpa"."""
    group = q.shape[1] // k.shape[1]
    per_backend = {}
    for name, backend in SDPA_BACKENDS:
        for suffix, kk, vv, gqa in sdpa_inputs(k, v, group):
            def attn(kk=kk, vv=vv, gqa=gqa):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

            try:
                with sdpa_kernel([backend]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the "kernel not used because ..." warnings of a refusal
                    fwd = bench_forward(attn, args)
                    fwdbwd, peak = bench_forward_backward(attn, grad, [q, kk, vv], args)
            except RuntimeError as err:  # backend refuses these inputs, or out of memory
                print(f"{label} sdpa {name}{suffix}: skipped ({first_line(err)})", flush=True)
                q.grad = None
                torch.cuda.empty_cache()
                continue
            per_backend[name + suffix] = dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, peak_mb=peak)
            print(f"{label} sdpa {name + suffix:<13} fwd {fwd:8.3f} ms  f+b {fwdbwd:8.3f} ms  "
                  f"peak {peak:8.0f} MB", flush=True)
            break
    row = dict(sdpa_fwd_ms=None, sdpa_fwd_backend=None, sdpa_fwdbwd_ms=None, sdpa_fwdbwd_backend=None,
               sdpa_peak_mb=None, sdpa_by_backend=per_backend)
    if per_backend:
        fastest_fwd = min(per_backend, key=lambda b: per_backend[b]["fwd_ms"])
        fastest = min(per_backend, key=lambda b: per_backend[b]["fwdbwd_ms"])
        row.update(sdpa_fwd_ms=per_backend[fastest_fwd]["fwd_ms"], sdpa_fwd_backend=fastest_fwd,
                   sdpa_fwdbwd_ms=per_backend[fastest]["fwdbwd_ms"], sdpa_fwdbwd_backend=fastest,
                   sdpa_peak_mb=per_backend[fastest]["peak_mb"])
    return row


# ----------------------------------------------------------------------------------------------------------
# FlexAttention


def sparsek_mask_mod(start: Tensor, end: Tensor, window: int, group: int):
    """The hard SparseK+window mask; start, end [B, Hk, T]. Query head h reads KV head h // group."""

    def mask_mod(b, h, q_idx, kv_idx):
        hk = h // group
        in_window = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
        selected = (start[b, hk, kv_idx] <= q_idx) & (q_idx < end[b, hk, kv_idx])
        return in_window | selected

    return mask_mod


def _keys_per_tile(first: Tensor, last: Tensor, valid: Tensor, n_blocks: int, block: int) -> Tensor:
    """Per tile (query block m, key block n): how many keys j of key block n have first_j <= m <= last_j.

    first, last, valid [R, T] (query-block ranges of the keys; valid False for an empty range) -> [R, NB, NB]
    indexed [row, query block, key block]. One difference array over query blocks per (row, key block).
    """
    rows, t_len = first.shape
    key_block = torch.arange(t_len, device=first.device) // block
    base = (torch.arange(rows, device=first.device).view(-1, 1) * n_blocks + key_block) * (n_blocks + 1)
    size = rows * n_blocks * (n_blocks + 1)
    diff = (torch.bincount((base + first)[valid], minlength=size)
            - torch.bincount((base + last + 1)[valid], minlength=size))
    return diff.view(rows, n_blocks, n_blocks + 1).cumsum(-1)[..., :n_blocks].transpose(1, 2)


def _kv_blocks(dense: Tensor) -> tuple[Tensor, Tensor]:
    """[B, H, NB, NB] bool -> counts [B, H, NB] and key-block indices [B, H, NB, NB] (set blocks first)."""
    counts = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def sparsek_block_mask(start: Tensor, end: Tensor, window: int, group: int, mask_mod) -> BlockMask:
    """The BlockMask of `sparsek_mask_mod` from the ranges, in O(T) work per row plus O(NB^2) per head.

    A tile is partial (mask_mod applied) if some pair in it is allowed and full (mask_mod skipped) if every
    pair is, by the window alone or by the selection alone; a tile full only by their union stays partial,
    which costs a little speed, never correctness. start, end [B, Hk, T] with T a multiple of FLEX_BLOCK.
    """
    batch, n_kv_heads, t_len = start.shape
    block, n_blocks = FLEX_BLOCK, t_len // FLEX_BLOCK
    s, e = start.reshape(-1, t_len).long(), end.reshape(-1, t_len).long()
    # Selection: key j is selected by queries [s_j, e_j); it touches query blocks s_j // block .. (e_j - 1) //
    # block and covers the whole of query blocks ceil(s_j / block) .. e_j // block - 1.
    touched = _keys_per_tile(s // block, (e - 1) // block, e > s, n_blocks, block) > 0
    first_full, last_full = (s + block - 1) // block, e // block - 1
    covered = _keys_per_tile(first_full, last_full, first_full <= last_full, n_blocks, block) == block
    # Window band i - window < j <= i on tiles [q0, q0 + block) x [k0, k0 + block).
    q0 = torch.arange(n_blocks, device=start.device).view(-1, 1) * block
    k0 = torch.arange(n_blocks, device=start.device).view(1, -1) * block
    band_any = (k0 <= q0 + block - 1) & (k0 + block - 1 > q0 - window) & (window > 0)
    band_full = (k0 + block - 1 <= q0) & (k0 > q0 + block - 1 - window)

    def per_query_head(tiles: Tensor) -> Tensor:
        return tiles.view(batch, n_kv_heads, n_blocks, n_blocks).repeat_interleave(group, dim=1)

    any_allowed = per_query_head(touched | band_any)
    full = per_query_head(covered | band_full)
    return BlockMask.from_kv_blocks(*_kv_blocks(any_allowed & ~full), *_kv_blocks(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod)


def check_flex(flex_attn, q, k, v, start, end, window, label: str) -> float:
    """Largest per-row relative error of the flex forward against SDPA with the dense boolean mask."""
    group = q.shape[1] // k.shape[1]
    t_len = q.shape[2]
    i = torch.arange(t_len, device=q.device).view(-1, 1)
    j = torch.arange(t_len, device=q.device).view(1, -1)
    allowed = ((j <= i) & (j > i - window)) | ((start.unsqueeze(-2) <= i) & (i < end.unsqueeze(-2)))
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, dim=1),
                                             v.float().repeat_interleave(group, dim=1),
                                             attn_mask=allowed.repeat_interleave(group, dim=1))
        out = flex_attn().float()
    err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-6)).max().item()
    verdict = "ok" if err < 2e-2 else "WARNING: flex mask does not match SparseK+window"
    print(f"{label} check: flex vs SDPA with the dense mask, max row relative error {err:.2e} ({verdict})",
          flush=True)
    return err


def bench_flex(q, k, v, grad, start, end, args, label: str, check: bool) -> dict:
    """Compiled FlexAttention with the SparseK+window mask; errors are reported and the row goes on."""
    row = dict(flex_fwd_ms=None, flex_fwdbwd_ms=None, flex_block_density=None, flex_check_error=None,
               flex_error=None)
    batch, n_q_heads, t_len, _ = q.shape
    group = n_q_heads // k.shape[1]
    if t_len > args.flex_max_len:
        return row
    if args.flex_mask == "ranges" and t_len % FLEX_BLOCK:
        row["flex_error"] = f"T must be a multiple of {FLEX_BLOCK}"
        print(f"{label} flex: skipped ({row['flex_error']})", flush=True)
        return row
    torch.compiler.reset()  # a fresh cache per shape: no recompile limit, no guards holding old tensors
    try:
        mask_mod = sparsek_mask_mod(start, end, args.window, group)
        if args.flex_mask == "ranges":
            block_mask = sparsek_block_mask(start, end, args.window, group, mask_mod)
        else:
            block_mask = torch.compile(create_block_mask)(mask_mod, batch, n_q_heads, t_len, t_len,
                                                          device=q.device)
        causal_tiles = n_q_heads * batch * (t_len // FLEX_BLOCK) * (t_len // FLEX_BLOCK + 1) / 2
        row["flex_block_density"] = block_mask.to_dense().sum().item() / causal_tiles
        flex = torch.compile(flex_attention, dynamic=False)

        def attn():
            return flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1)

        print(f"{label} flex: compiling (block density {row['flex_block_density']:.3f} of causal)", flush=True)
        if check and batch * n_q_heads * t_len * t_len <= CHECK_MAX_ELEMENTS:
            row["flex_check_error"] = check_flex(attn, q, k, v, start, end, args.window, label)
        row["flex_fwd_ms"] = bench_forward(attn, args)
        row["flex_fwdbwd_ms"], _ = bench_forward_backward(attn, grad, [q, k, v], args)
    except Exception as err:  # out of memory, compile errors: report '-' and go on
        row["flex_error"] = first_line(err)
        print(f"{label} flex: failed ({row['flex_error']})", flush=True)
    finally:
        q.grad = k.grad = v.grad = None
        torch.compiler.reset()
        torch.cuda.empty_cache()
    fwd, fwdbwd = row["flex_fwd_ms"], row["flex_fwdbwd_ms"]
    if fwd is not None:
        print(f"{label} flex     fwd {fwd:8.3f} ms  f+b {fmt(fwdbwd, '8.3f')} ms", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------
# FLA's NSA, the trainable sparse peer


def nsa_unavailable(n_q_heads: int, n_kv_heads: int, topk: int) -> str | None:
    """Why the NSA row cannot run at this shape, or None when it can."""
    group = n_q_heads // n_kv_heads
    if group < NSA_MIN_GROUP or group & (group - 1):
        return f"NSA needs a GQA group that is a power of 2 of at least {NSA_MIN_GROUP}, got {group}"
    if topk < NSA_BLOCK or topk % NSA_BLOCK:
        return f"NSA selects blocks of {NSA_BLOCK} keys: topk must be a multiple of {NSA_BLOCK}, got {topk}"
    try:
        import fla.ops.attn.parallel  # noqa: F401
        import fla.ops.nsa.parallel  # noqa: F401
    except ImportError as err:
        return f"fla is not importable (pip install fla-core): {first_line(err)}"
    return None


def bench_nsa(q, k, v, grad, args, label: str) -> dict:
    """NSA + sliding window on [B, T, H, D] inputs, forward and forward+backward; errors are reported and the
    row goes on."""
    row = dict(nsa_fwd_ms=None, nsa_fwdbwd_ms=None, nsa_error=nsa_unavailable(q.shape[2], k.shape[2], args.topk))
    if row["nsa_error"] is not None:
        print(f"{label} nsa: skipped ({row['nsa_error']})", flush=True)
        return row
    from fla.ops.attn.parallel import parallel_attn
    from fla.ops.nsa.parallel import parallel_nsa

    gates = [torch.rand(q.shape[:3], device=q.device, dtype=q.dtype).requires_grad_() for _ in range(3)]
    g_cmp, g_slc, g_swa = gates

    def attn():
        o = parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=args.topk // NSA_BLOCK,
                         block_size=NSA_BLOCK)
        return o + parallel_attn(q, k, v, window_size=args.window) * g_swa.unsqueeze(-1)

    try:
        row["nsa_fwd_ms"] = bench_forward(attn, args)
        row["nsa_fwdbwd_ms"], _ = bench_forward_backward(attn, grad, [q, k, v, *gates], args)
    except Exception as err:  # an fla version with another API, out of memory: report '-' and go on
        row["nsa_error"] = first_line(err)
        print(f"{label} nsa: failed ({row['nsa_error']})", flush=True)
    finally:
        q.grad = k.grad = v.grad = None
        torch.cuda.empty_cache()
    if row["nsa_fwd_ms"] is not None:
        print(f"{label} nsa      fwd {row['nsa_fwd_ms']:8.3f} ms  f+b {row['nsa_fwdbwd_ms']:8.3f} ms", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------
# one row


def attention_flops(batch: int, t_len: int, n_q_heads: int, head_dim: int, topk: int, window: int) -> float:
    """Forward FLOPs at the nominal budget: QK^T and PV, 2 * D each, per query and attended key."""
    return 4.0 * batch * t_len * (topk + window) * head_dim * n_q_heads


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def bench_row(t_len: int, n_q_heads: int, n_kv_heads: int, args, check: bool) -> dict:
    label = f"[{n_q_heads}/{n_kv_heads} T={t_len:>6}]"
    device, batch, head_dim = args.device, args.batch, args.head_dim

    def leaf(*shape, dtype=torch.bfloat16) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    q = leaf(batch, t_len, n_q_heads, head_dim)
    k = leaf(batch, t_len, n_kv_heads, head_dim)
    v = leaf(batch, t_len, n_kv_heads, head_dim)
    scores = leaf(batch, t_len, n_kv_heads, dtype=torch.float32)
    grad = torch.randn(batch, t_len, n_q_heads, head_dim, device=device, dtype=torch.bfloat16)

    row = dict(T=t_len, heads=f"{n_q_heads}/{n_kv_heads}", n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
               batch=batch, head_dim=head_dim, topk=args.topk, window=args.window, gate=args.gate)
    row.update(bench_sparsek(q, k, v, scores, grad, args, label, check))
    row.update(bench_nsa(q, k, v, grad, args, label))

    def bhtd(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, T, D] contiguous leaf
        return x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)

    qt, kt, vt, gradt = bhtd(q), bhtd(k), bhtd(v), bhtd(grad)
    del q, k, v, grad
    row.update(bench_sdpa(qt, kt, vt, gradt, args, label))

    if not args.no_flex:
        start, end, _ = selection(scores, args.topk, args.window)
        start, end = start.view(batch, n_kv_heads, t_len), end.view(batch, n_kv_heads, t_len)
        row.update(bench_flex(qt, kt, vt, gradt, start, end, args, label, check))
    else:
        row.update(flex_fwd_ms=None, flex_fwdbwd_ms=None)

    flops = attention_flops(batch, t_len, n_q_heads, head_dim, args.topk, args.window)
    sk_fwd, sk_fwdbwd = row["sparsek_fwd_ms"], row["sparsek_fwdbwd_ms"]
    row.update(
        sparsek_fwd_tflops=flops / sk_fwd * 1e-9,
        sparsek_fwdbwd_tflops=FWDBWD_FLOP_FACTOR * flops / sk_fwdbwd * 1e-9,
        selection_share=row["selection_ms"] / sk_fwdbwd,
        speedup_sdpa_fwd=ratio(row["sdpa_fwd_ms"], sk_fwd),
        speedup_sdpa_fwdbwd=ratio(row["sdpa_fwdbwd_ms"], sk_fwdbwd),
        speedup_flex_fwd=ratio(row["flex_fwd_ms"], sk_fwd),
        speedup_flex_fwdbwd=ratio(row["flex_fwdbwd_ms"], sk_fwdbwd),
        speedup_nsa_fwdbwd=ratio(row["nsa_fwdbwd_ms"], sk_fwdbwd),
    )
    torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------------------------
# output


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], env: dict) -> None:
    print(f"\nGPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}; B={rows[0]['batch']}, "
          f"D={rows[0]['head_dim']}, topk={rows[0]['topk']}, window={rows[0]['window']}, gate={rows[0]['gate']}, "
          "bf16, median ms; speedup = other ms / sparsek ms; TF/s = sparsek forward TFLOP/s; "
          "sel % = selection / sparsek f+b; nsa = FLA's NSA + sliding window at the same keys per query; "
          "peak MB = fwd+bwd, sparsek / sdpa; "
          "sdpa backend = fastest for fwd / for f+b")
    columns = [  # header, width, row -> text
        ("T", 7, lambda r: str(r["T"])),
        ("heads", 6, lambda r: r["heads"]),
        ("sk fwd", 8, lambda r: fmt(r["sparsek_fwd_ms"], ".3f")),
        ("sdpa fwd", 8, lambda r: fmt(r["sdpa_fwd_ms"], ".3f")),
        ("flex fwd", 8, lambda r: fmt(r["flex_fwd_ms"], ".3f")),
        ("sk f+b", 8, lambda r: fmt(r["sparsek_fwdbwd_ms"], ".3f")),
        ("sdpa f+b", 8, lambda r: fmt(r["sdpa_fwdbwd_ms"], ".3f")),
        ("flex f+b", 8, lambda r: fmt(r["flex_fwdbwd_ms"], ".3f")),
        ("nsa f+b", 8, lambda r: fmt(r["nsa_fwdbwd_ms"], ".3f")),
        ("x sdpa", 6, lambda r: fmt(r["speedup_sdpa_fwdbwd"], ".2f")),
        ("x flex", 6, lambda r: fmt(r["speedup_flex_fwdbwd"], ".2f")),
        ("x nsa", 6, lambda r: fmt(r["speedup_nsa_fwdbwd"], ".2f")),
        ("TF/s", 5, lambda r: fmt(r["sparsek_fwd_tflops"], ".0f")),
        ("sel %", 5, lambda r: fmt(100 * r["selection_share"], ".1f")),
        ("peak MB", 13, lambda r: f"{fmt(r['sparsek_peak_mb'], '.0f')}/{fmt(r['sdpa_peak_mb'], '.0f')}"),
        ("sdpa backend", 0, lambda r: f"{r['sdpa_fwd_backend'] or '-'}/{r['sdpa_fwdbwd_backend'] or '-'}"),
    ]
    print(" ".join(f"{name:>{width}}" for name, width, _ in columns))
    for r in rows:
        print(" ".join(f"{cell(r):>{width}}" for _, width, cell in columns))


def write_json(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """ms against T, log-log, one panel per head config: solid forward, dashed forward+backward."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[training]'): no plot")
        return
    heads = list(dict.fromkeys(r["heads"] for r in rows))
    fig, axes = plt.subplots(1, len(heads), figsize=(6 * len(heads), 4.5), squeeze=False)
    for ax, head in zip(axes[0], heads):
        sub = [r for r in rows if r["heads"] == head]
        for method, color in (("sparsek", "C0"), ("sdpa", "C1"), ("flex", "C2"), ("nsa", "C3")):
            for mode, style, name in (("fwd", "-", "fwd"), ("fwdbwd", "--", "fwd+bwd")):
                points = [(r["T"], r[f"{method}_{mode}_ms"]) for r in sub if r.get(f"{method}_{mode}_ms")]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker="o", ms=3, label=f"{method} {name}")
        r0 = sub[0]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="T", ylabel="median ms",
               title=f"Hq/Hk {head}, D={r0['head_dim']}, topk={r0['topk']}, window={r0['window']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------------------


def parse_heads(text: str) -> tuple[int, int]:
    try:
        n_q_heads, n_kv_heads = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"heads must look like 32/8 (Hq/Hk), got {text!r}") from None
    if n_kv_heads < 1 or n_q_heads % n_kv_heads:
        raise argparse.ArgumentTypeError(f"Hq must be a multiple of Hk, got {text!r}")
    return n_q_heads, n_kv_heads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=DEFAULT_SEQ_LENS)
    parser.add_argument("--heads", type=parse_heads, nargs="+", default=[(16, 16), (32, 8), (64, 4)],
                        help="Hq/Hk pairs (default: 16/16 32/8 64/4; NSA runs at 64/4 only)")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gate", choices=["kv", "v", "none"], default="kv")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (and its compile time)")
    parser.add_argument("--flex-max-len", type=int, default=65536)
    parser.add_argument("--flex-mask", choices=["ranges", "create"], default="ranges",
                        help="block mask from the selection ranges, or torch.compile(create_block_mask)")
    parser.add_argument("--rep", type=int, default=100, help="ms of timed repeats per measurement")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention"))
    parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_SEQ_LENS} only (smoke test)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens = QUICK_SEQ_LENS
    return args


def main() -> None:
    args = parse_args()
    args.device = torch.device(args.device)
    if args.device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"this benchmark needs a CUDA GPU, got --device {args.device}")
    if args.device.index is not None:
        torch.cuda.set_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(args.device), torch=torch.__version__, triton=triton.__version__)
    print(f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)

    torch.manual_seed(0)
    began = time.perf_counter()
    rows = []
    for n_q_heads, n_kv_heads in args.heads:
        for t_len in args.seq_lens:
            row = bench_row(t_len, n_q_heads, n_kv_heads, args, check=t_len == min(args.seq_lens))
            rows.append({**row, **env})
            write_json(rows, args.out / "results.json")
    print(f"done in {time.perf_counter() - began:.0f} s; results: {args.out / 'results.json'}")
    plot(rows, args.out / "attention.png")
    print_table(rows, env)


if __name__ == "__main__":
    main()
