"""Where the time of fused SparseK attention goes: each stage timed alone on one GPU.

    python -m sparsek.bench.breakdown                      # T = 4k, 32k, 128k; 16 heads, D = 128, bf16
    python -m sparsek.bench.breakdown --seq-lens 32768 --heads 32 --kv-heads 8
    ncu --set full -o attention python -m sparsek.bench.breakdown --seq-lens 32768 --once

Stages: selection (thresholds + key ranges, alone and graphed together with the block-128 lists), the forward
kernel, the backward's dq, list and band passes (on the forward's lists; each with its outputs and scratch, as
the attention runs it) and the threshold backward (graphed up to 2^19 scores, as in the attention). Where the
Gluon kernels run (sm_90, Triton 3.6), the Gluon forward and dq pass are timed too, on the same inputs. Medians of
triton.testing.do_bench in ms; a table is printed last, then each kernel's effective rate in TFLOP/s
(`effective_tflops`: the matmul FLOPs over the pairs a query attends, as the forward's 4 T (topk + window) D
Hq). `--once` times nothing and prints nothing: the selection, the forward and the three backward passes then
run once each, so that a profiler (Nsight Compute) sees one launch of each attention kernel.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from sparsek.ops.attention import fused
from sparsek.ops.common import tiles
from sparsek.ops.select.fused import select_rows_triton


def ms(fn) -> float:
    return do_bench(fn, warmup=20, rep=100, return_mode="median")


def untimed(fn) -> float:
    """--once: time nothing; breakdown() still runs each kernel once, for the outputs the next stage needs."""
    return float("nan")


def breakdown(t_len: int, heads: int, kv_heads: int, head_dim: int, topk: int, window: int, ms=ms) -> dict:
    window = min(window, t_len)                                    # as the attention clamps it
    q = torch.randn(1, t_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, t_len, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scores = torch.randn(1, t_len, kv_heads, device="cuda")
    u = fused.score_rows(scores)
    scale = head_dim ** -0.5
    row = dict(T=t_len)
    row["select"] = ms(lambda: select_rows_triton(u, topk, window))
    block = tiles.forward(tiles.target(q.device), head_dim)["BLOCK_M"]  # the block of the forward's key lists
    row["select+lists (graphed)"] = ms(lambda: fused.forward_selection((u,), (topk, window, block)))
    tau, start, end, lists, poison = fused.forward_selection((u,), (topk, window, block))

    row["fwd kernel"] = ms(lambda: fused.fused_forward(q, k, v, u, tau, start, end, lists, poison, window, "kv",
                                                       scale))
    out, lse = fused.fused_forward(q, k, v, u, tau, start, end, lists, poison, window, "kv", scale)
    grad_out = torch.randn_like(q)
    # Each backward pass as the attention runs it, its outputs allocated inside (as there).
    row["bwd dq pass"] = ms(lambda: fused.dq_pass(grad_out, q, k, v, out, lse, u, tau, start, end, lists, window,
                                                  "kv", scale))
    if fused.choose_forward(q, "auto", k, v) == "gluon":        # sm_90 with Triton 3.6: the Gluon kernels too
        from sparsek.ops.attention import gluon
        row["fwd gluon"] = ms(lambda: gluon.fused_forward_gluon(q, k, v, u, tau, start, end, lists, poison, window,
                                                                "kv", scale))
        row["bwd dq gluon"] = ms(lambda: gluon.dq_pass_gluon(grad_out, q, k, v, out, lse, u, tau, start, end, lists,
                                                             window, "kv", scale))
    _, dtau, delta = fused.dq_pass(grad_out, q, k, v, out, lse, u, tau, start, end, lists, window, "kv", scale)
    row["bwd list pass"] = ms(lambda: fused.list_pass(grad_out, q, k, v, lse, delta, u, tau, end, lists, topk, window,
                                                      "kv", scale))
    scratch = fused.list_pass(grad_out, q, k, v, lse, delta, u, tau, end, lists, topk, window, "kv", scale)
    row["bwd band pass"] = ms(lambda: fused.band_pass(grad_out, q, k, v, lse, delta, u, tau, start, end, scratch,
                                                      window, "kv", scale))
    _, _, du = fused.band_pass(grad_out, q, k, v, lse, delta, u, tau, start, end, scratch, window, "kv", scale)
    row["threshold bwd (graphed)"] = ms(lambda: fused.graphed_threshold_backward((u, tau, dtau, du), (window,)))
    return row


def effective_tflops(row: dict, heads: int, head_dim: int, topk: int, window: int) -> dict:
    """TFLOP/s of the forward and of each backward pass in a `breakdown` row, counting 2 FLOPs per multiply-add
    of the matmuls over the pairs that matter: each query's topk selected keys and its window (both capped at
    T). The forward does 2 matmuls per pair (Q K^T, P V), the dq pass 3 (Q K^T, dO V^T, dS K) over every pair,
    the list pass 4 (Q K^T, dO V^T, P^T dO, dS^T Q) over the selected keys, the band pass the same 4 over the
    window."""
    t_len = row["T"]
    selected, in_window = min(topk, t_len), min(window, t_len)
    per_matmul = 2 * t_len * head_dim * heads                      # FLOPs of one matmul, per pair per query
    flops = {"fwd kernel": 2 * per_matmul * (selected + in_window),
             "bwd dq pass": 3 * per_matmul * (selected + in_window),
             "bwd list pass": 4 * per_matmul * selected,
             "bwd band pass": 4 * per_matmul * in_window}
    flops["fwd gluon"], flops["bwd dq gluon"] = flops["fwd kernel"], flops["bwd dq pass"]
    return {name: flop / (row[name] * 1e-3) / 1e12 for name, flop in flops.items() if name in row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--once", action="store_true", help="run each stage once, untimed (for a profiler)")
    args = parser.parse_args()
    torch.manual_seed(0)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    time = untimed if args.once else ms
    rows = [breakdown(t, args.heads, kv_heads, args.head_dim, args.topk, args.window, time) for t in args.seq_lens]
    if args.once:
        return
    print(f"{torch.cuda.get_device_name()}, heads={args.heads}/{kv_heads}, D={args.head_dim}, topk={args.topk}, "
          f"window={args.window}, bf16, median ms")
    names = list(rows[0])
    print("  ".join(f"{n:>12}" if n == "T" else f"{n:>{max(len(n), 8)}}" for n in names))
    for row in rows:
        print("  ".join(f"{row[n]:>12}" if n == "T" else f"{row[n]:>{max(len(n), 8)}.3f}" for n in names))
    print("\neffective TFLOP/s (see effective_tflops)")
    rates = [effective_tflops(row, args.heads, args.head_dim, args.topk, args.window) for row in rows]
    print("  ".join([f"{'T':>12}"] + [f"{n:>13}" for n in rates[0]]))
    for row, rate in zip(rows, rates):
        print("  ".join([f"{row['T']:>12}"] + [f"{r:>13.0f}" for r in rate.values()]))


if __name__ == "__main__":
    main()
