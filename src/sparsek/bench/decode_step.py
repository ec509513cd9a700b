"""Where one layer's decode step goes: the fused cache update, the attention kernel and both together
(`SparseKCache.step`), against SDPA over a full cache, on one GPU.

    python -m sparsek.bench.decode_step                   # SmolLM2-135M's layer: 9/3 heads of dim 64, bf16
    python -m sparsek.bench.decode_step --batches 1,8,64 --contexts 4096,65536

Each call is captured 50 times in a CUDA graph and replayed, so launch overhead is left out; the median of 5
replays per call is printed in microseconds. The SparseK cache is prefilled from random keys and scores of the
context's length; SDPA attends the whole context (a full cache's step, without the model around it).
"""

from __future__ import annotations

import argparse
import copy

import torch

from sparsek.cache import SparseKCache
from sparsek.ops.decode import fused

CALLS = 50


def microseconds(fn) -> float:
    """Median time of one call, from 5 replays of a CUDA graph of CALLS calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return sorted(times)[2]


def step_parts(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, topk: int,
               window: int) -> dict[str, float]:
    """Microseconds of each part of one layer's step for a cache after `context` tokens."""
    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    k, v = randn(batch, context, kv_heads, head_dim), randn(batch, context, kv_heads, head_dim)
    cache = SparseKCache.prefill(k, v, randn(batch, context, kv_heads, dtype=torch.float32), topk=topk,
                                 window=window)
    q, k_t, v_t = randn(batch, q_heads, head_dim), randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
    u_t = randn(batch, kv_heads, dtype=torch.float32)
    weight, attended, _ = fused.cache_step(copy.deepcopy(cache), k_t, v_t, u_t)
    group = q_heads // kv_heads
    full_k, full_v = (x.transpose(1, 2).repeat_interleave(group, 1) for x in (k, v))
    return {
        "step": microseconds(lambda: cache.step(q, k_t, v_t, u_t, backend="triton")),
        "cache update": microseconds(lambda: fused.cache_step(cache, k_t, v_t, u_t)),
        "attention": microseconds(lambda: fused.decode_attention_triton(q, cache.keys, cache.values, weight,
                                                                        attended)),
        "sdpa, full cache": microseconds(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], full_k, full_v)),
        "kept scores": cache.kept_u.shape[-1],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="4096,65536")
    parser.add_argument("--q-heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sparsek.bench.decode_step needs a CUDA GPU (it times CUDA graphs)")
    torch.manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            parts = step_parts(batch, context, args.q_heads, args.kv_heads, args.head_dim, args.topk, args.window)
            rows.append({"batch": batch, "context": context, **parts})
            print(f"B={batch} T={context}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    print(f"\n{torch.cuda.get_device_name()}; one layer: {args.q_heads}/{args.kv_heads} heads of dim {args.head_dim}, "
          f"topk {args.topk} + window {args.window}, bf16; microseconds per call (CUDA graphs of {CALLS} calls)")
    names = ["step", "cache update", "attention", "sdpa, full cache"]
    print(f"{'B':>3} {'T':>7} {'kept':>6} " + " ".join(f"{n:>17}" for n in names))
    for row in rows:
        print(f"{row['batch']:>3} {row['context']:>7} {row['kept scores']:>6} "
              + " ".join(f"{row[n]:>17.1f}" for n in names))
    return rows


if __name__ == "__main__":
    main()
