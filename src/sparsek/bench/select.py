"""How prefix selection scales with T: it should grow like T log T, not T^2.

    python -m sparsek.bench.select                       # CPU, T = 1k .. 64k, 4 heads
    python -m sparsek.bench.select --device cuda --max-log2 17

Prints the median time per call and time / (T log2 T) normalised to the smallest T: a flat last column
means T log T growth (a T^2 method would double it at every step).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sparsek.ops.select import prefix_selection


def time_call(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rows = []
    for log2 in range(args.min_log2, args.max_log2 + 1):
        t_len = 1 << log2
        scores = torch.randn(1, t_len, args.heads, device=args.device)
        seconds = time_call(lambda s=scores: prefix_selection(s, args.topk, args.window), args.repeats, args.device)
        rows.append((t_len, seconds, seconds / (t_len * math.log2(t_len))))
    base = rows[0][2]
    print(f"prefix_selection on {args.device}, heads={args.heads}, topk={args.topk}, window={args.window}")
    print(f"{'T':>8} {'median ms':>10} {'ms / (T log2 T), relative':>27}")
    for t_len, seconds, per in rows:
        print(f"{t_len:>8} {seconds * 1e3:>10.2f} {per / base:>27.2f}")


if __name__ == "__main__":
    main()
