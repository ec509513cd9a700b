"""Where the time of fused SparseK attention goes: each stage timed alone on one GPU.

    python -m sparsek.bench.breakdown                      # T = 4k, 32k, 128k; 16 heads, D = 128, bf16
    python -m sparsek.bench.breakdown --seq-lens 32768 --heads 32 --kv-heads 8

Stages: selection (thresholds + key ranges, alone and graphed together with the block-128 lists), the forward
kernel, the backward's dq, band and list passes (on the forward's lists; the list pass with its scratch, as the
attention runs it) and the threshold backward (graphed up to 2^19 scores, as in the attention). Medians of
triton.testing.do_bench in ms; a table is printed last.
"""

from __future__ import annotations

import argparse

import torch
import triton
from triton.testing import do_bench

from sparsek.ops.attention import fused, kernels
from sparsek.ops.select.fused import select_rows_triton


def ms(fn) -> float:
    return do_bench(fn, warmup=20, rep=100, return_mode="median")


def breakdown(t_len: int, heads: int, kv_heads: int, head_dim: int, topk: int, window: int) -> dict:
    window = min(window, t_len)                                    # as the attention clamps it
    q = torch.randn(1, t_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, t_len, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scores = torch.randn(1, t_len, kv_heads, device="cuda")
    group = heads // kv_heads
    u = fused._rows(scores)
    scale = head_dim ** -0.5
    row = dict(T=t_len)
    row["select"] = ms(lambda: select_rows_triton(u, topk, window))
    block = fused.forward_tiles(head_dim)["BLOCK_M"]                  # the block of the forward's key lists
    row["select+lists (graphed)"] = ms(lambda: fused.forward_selection((u,), (topk, window, block)))
    tau, start, end, lists, poison = fused.forward_selection((u,), (topk, window, block))

    row["fwd kernel"] = ms(lambda: fused.fused_forward(q, k, v, u, tau, start, end, lists, poison, window, "kv",
                                                       scale))
    out, lse = fused.fused_forward(q, k, v, u, tau, start, end, lists, poison, window, "kv", scale)
    grad_out = torch.randn_like(q)
    delta = torch.empty(heads, t_len, device="cuda")               # written by the dq pass
    tiles = fused.backward_tiles(head_dim)
    list_block = tiles["list"]["BLOCK_M"]
    n_blocks, n_slots = lists.shape[1], lists.shape[2]
    n_tiles = triton.cdiv(t_len, tiles["dq"]["BLOCK_M"])          # query tiles of the dq pass
    dq, dtau = torch.empty_like(q), torch.empty(heads, t_len, device="cuda")
    dk_list, dv_list = torch.zeros(k.shape, device="cuda"), torch.zeros(k.shape, device="cuda")
    du_list, du = torch.zeros(kv_heads, t_len, device="cuda"), torch.zeros(kv_heads, t_len, device="cuda")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    strides = fused._strides(q, k, v, grad_out)
    common = dict(GATE=0, DOT="tf32", HEAD_DIM=head_dim)
    row["bwd dq pass"] = ms(lambda: kernels.sparsek_bwd_dq_kernel[(n_tiles, heads)](
        q, k, v, u, tau, start, end, lists, grad_out, out, lse, delta, dq, dtau, *strides,
        t_len, n_slots, n_blocks, window, heads, group, scale, **common, LIST_BLOCK=list_block, **tiles["dq"]))
    row["bwd band pass"] = ms(lambda: kernels.sparsek_bwd_band_kernel[
        (triton.cdiv(t_len, tiles["band"]["BLOCK_N"]), kv_heads)](
        q, k, v, u, tau, start, end, grad_out, lse, delta, dk_list, dv_list, du_list, dk, dv, du, *strides,
        t_len, triton.cdiv(t_len, tiles["band"]["BLOCK_M"]), window, heads, group, scale, **common,
        LIST_BLOCK=list_block, **tiles["band"]))
    row["bwd list pass"] = ms(lambda: fused.list_pass(grad_out, q, k, v, lse, delta, u, tau, end, lists, topk, window,
                                                      "kv", scale))
    row["threshold bwd (graphed)"] = ms(lambda: fused.graphed_threshold_backward((u, tau, dtau, du), (window,)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    rows = [breakdown(t, args.heads, kv_heads, args.head_dim, args.topk, args.window) for t in args.seq_lens]
    print(f"{torch.cuda.get_device_name()}, heads={args.heads}/{kv_heads}, D={args.head_dim}, topk={args.topk}, "
          f"window={args.window}, bf16, median ms")
    names = list(rows[0])
    print("  ".join(f"{n:>12}" if n == "T" else f"{n:>{max(len(n), 8)}}" for n in names))
    for row in rows:
        print("  ".join(f"{row[n]:>12}" if n == "T" else f"{row[n]:>{max(len(n), 8)}.3f}" for n in names))


if __name__ == "__main__":
    main()
