"""SparseK attention on the CPU: forward + backward time against full causal attention, as T grows.

    python -m sparsek.bench.cpu_attention                       # T = 512 .. 4096, topk = window = 64
    python -m sparsek.bench.cpu_attention --seq-lens 512,1024,2048,4096,8192 --topk 128 --window 128
    python -m sparsek.bench.cpu_attention --paths sdpa,gather   # skip the O(T^2) reference at long T

Paths: "sdpa" is full causal attention (torch SDPA, is_causal=True, enable_gqa for GQA), "reference" the
dense chunked SparseK reference (O(T^2)), "gather" the gathered SparseK path (O(T * (topk + window))), both
through `sparsek_attention` with the backend forced. Each timing is the median of --repeats calls of forward
plus backward (gradients of q, k, v and the scores) after one warm-up; the paths take turns, one call each per
round, so that a shared machine's drift does not favour one of them. ms / token should stay flat for a
path linear in T and double with T for a quadratic one (sdpa's is quadratic too, only with a small constant).
The table is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsek.ops.attention import sparsek_attention
from sparsek.ops.common import GATES

PATHS = ("sdpa", "reference", "gather")


def full_causal(q, k, v, scores, **_):
    """q [B, T, Hq, D], k, v [B, T, Hk, D] -> [B, T, Hq, D]; scores unused. GQA inside SDPA (enable_gqa), as
    baselines.attention runs it: repeating the KV heads first costs a copy each way (0.55 against 0.43 ms at
    T = 128 on a 2-core CPU)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_fn(path: str):
    if path == "sdpa":
        return full_causal
    return lambda *inputs, **kw: sparsek_attention(*inputs, backend=path, **kw)


def time_fwd_bwd(fns: dict, inputs, repeats: int, **kwargs) -> dict:
    """Median seconds of one forward + backward of each fn(*inputs, **kwargs), by name. The calls interleave
    (one of each per round, after one warm-up each), so a shared machine's drift reaches every path alike."""
    cotangent = torch.randn_like(inputs[0])

    def step(fn):
        for x in inputs:
            x.grad = None
        fn(*inputs, **kwargs).backward(cotangent)

    times = {name: [] for name in fns}
    for fn in fns.values():
        step(fn)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            step(fn)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="512,1024,2048,4096", help="comma-separated T (add 8192 for more)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--gate", default="kv", choices=GATES)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_lens = [int(t) for t in args.seq_lens.split(",")]

    torch.manual_seed(0)
    results = {}
    for t_len in seq_lens:
        inputs = [torch.randn(args.batch, t_len, args.heads, args.head_dim, requires_grad=True),
                  torch.randn(args.batch, t_len, args.kv_heads, args.head_dim, requires_grad=True),
                  torch.randn(args.batch, t_len, args.kv_heads, args.head_dim, requires_grad=True),
                  torch.randn(args.batch, t_len, args.kv_heads, requires_grad=True)]
        medians = time_fwd_bwd({path: attention_fn(path) for path in paths}, inputs, args.repeats, topk=args.topk,
                               window=args.window, gate=args.gate)
        for path in paths:
            results[t_len, path] = medians[path]
            print(f"T={t_len:>6} {path:>9}: {medians[path] * 1e3:9.2f} ms", flush=True)

    print(f"\nCPU, {torch.get_num_threads()} threads, forward + backward, B={args.batch}, heads={args.heads}/"
          f"{args.kv_heads}, D={args.head_dim}, topk={args.topk}, window={args.window}, gate={args.gate}, "
          f"median of {args.repeats}\n")
    header = "| T | " + " | ".join(f"{p} ms | {p} ms/token" for p in paths)
    if {"sdpa", "gather"} <= set(paths):
        header += " | gather speedup vs sdpa"
    print(header + " |")
    print("|---" * (1 + 2 * len(paths) + ({"sdpa", "gather"} <= set(paths))) + "|")
    for t_len in seq_lens:
        cells = [str(t_len)]
        for path in paths:
            seconds = results[t_len, path]
            cells += [f"{seconds * 1e3:.2f}", f"{seconds * 1e3 / (args.batch * t_len):.4f}"]
        if {"sdpa", "gather"} <= set(paths):
            cells.append(f"{results[t_len, 'sdpa'] / results[t_len, 'gather']:.2f}x")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
