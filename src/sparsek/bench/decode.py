"""Decode benchmark: per-token latency and memory against context length, SparseK cache against a full cache.

    python -m sparsek.bench.decode                      # GPU: SmolLM2-135M shape, contexts 4k..128k, batch 1, 16

The model is a random LlamaForCausalLM of SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads of dim 64) in
bf16: decode speed does not depend on the weights. Both caches are filled with random states of the given
context length instead of running a prefill (which would cost minutes at 128k x 16 and measures something
else): the full cache holds L keys and values per layer, attended with SDPA; the SparseK cache holds its
constant window + slots + kept scores with the position counters at L. Each timed step decodes one token for
every row (logits for that token only; no attention mask). The SparseK state is synthetic: topk + 1 kept
scores in a buffer of max_kept; a step's cost does not depend on how many are filled (every step scans the
whole buffer). Two ways to run a step:
  * eager, as generate() does: the full cache is transformers' DynamicCache;
  * captured once in a CUDA graph and replayed: the full cache is transformers' StaticCache (attending over its
    preallocated length, as its compiled decoding does), the SparseK cache as it is (fixed-size tensors).
Eager decoding of a 135M model is bound by kernel launches on the host, which hides the attention's cost;
the graphs remove that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1 << 18,
                     tie_word_embeddings=True)


def _model(device: str):
    """The random model, SDPA attention (convert switches a copy to SparseK)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE))
    model.set_attn_implementation("sdpa")
    return model.to(device, torch.bfloat16).eval()


def full_cache(model, batch: int, context: int, static: bool = False):
    """A full cache holding `context` random keys and values per layer: transformers' DynamicCache (what
    generate() uses), or a StaticCache with room for the timed steps (what its CUDA-graph decoding uses)."""
    from transformers import DynamicCache, StaticCache

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = StaticCache(config=config, max_cache_len=context + 64) if static else DynamicCache(config=config)
    positions = {"cache_position": torch.arange(context, device=model.device)}  # read by older StaticCaches
    for layer in range(config.num_hidden_layers):
        kv = torch.randn(2, batch, config.num_key_value_heads, context, head_dim, device=model.device,
                         dtype=torch.bfloat16)
        cache.update(kv[0], kv[1], layer, positions)
    return cache


def sparsek_cache(model, batch: int, context: int, static: bool = False):
    """A SparseKHFCache in the state it has after `context` tokens (random keys, values and scores)."""
    from ..cache import SparseKCache
    from ..integrations.hf import SparseKHFCache

    config, settings = model.config, model.config.sparsek
    topk, window = settings["topk"], settings["window"]
    head_dim = config.hidden_size // config.num_attention_heads
    cache = SparseKHFCache()
    for layer_idx in range(config.num_hidden_layers):
        state = SparseKCache(batch, config.num_key_value_heads, head_dim, topk, window, torch.bfloat16,
                             model.device)
        state.keys.normal_()
        state.values.normal_()
        state.scores.normal_()
        state.positions.copy_(torch.arange(topk + window, device=model.device))  # every entry holds a token
        state.kept_u[..., :topk + 1].normal_()           # topk + 1 kept scores, the rest of the buffer empty
        state.lengths.fill_(context)
        layer = cache.layer(layer_idx)
        layer.state, layer.seen = state, context
    return cache


@torch.no_grad()
def time_decode(model, cache, batch: int, context: int, steps: int, graphed: bool) -> list[float]:
    """Milliseconds of each decode step after warm-up; graphed: the step captured once in a CUDA graph and
    replayed (one launch per token instead of hundreds)."""
    from ..integrations.hf import cache_argument

    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    position = torch.full((batch, 1), context, device=model.device)

    def step():
        return model(token, position_ids=position, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(2):
            step()
            position.add_(1)
    torch.cuda.current_stream().wait_stream(warm)
    run = step
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        position.add_(1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cache_bytes(cache) -> int:
    """Bytes the cache holds (keys, values and, for SparseK, its scores and counters)."""
    from ..integrations.hf import SparseKHFCache

    if isinstance(cache, SparseKHFCache):
        return sum(layer.state.nbytes() for layer in cache.layers)
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="docs/bench/decode")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU")
    from ..integrations.hf import convert

    full = _model("cuda")
    sparse = convert(_model("cuda"), topk=args.topk, window=args.window)
    variants = (("full", full, full_cache, False), ("sparsek", sparse, sparsek_cache, False),
                ("full_graph", full, full_cache, True), ("sparsek_graph", sparse, sparsek_cache, True))
    rows = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            row = {"batch": batch, "context": context}
            for name, model, make, graphed in variants:
                cache = None
                torch.cuda.empty_cache()
                try:
                    cache = make(model, batch, context, static=graphed)
                    row[f"{name}_ms"] = statistics.median(time_decode(model, cache, batch, context, args.steps,
                                                                      graphed))
                    row[f"{name}_cache_gb"] = cache_bytes(cache) / 1e9
                except Exception as error:  # noqa: BLE001 -- one failed variant must not hide the others
                    print(f"  {name} B={batch} T={context}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    row[f"{name}_ms"] = row[f"{name}_cache_gb"] = float("nan")
                cache = None
            row["speedup"] = row["full_ms"] / row["sparsek_ms"]
            row["speedup_graph"] = row["full_graph_ms"] / row["sparsek_graph_ms"]
            rows.append(row)
            print(f"B={batch:<3} T={context:>6}  eager: full {row['full_ms']:7.2f} ms  sparsek "
                  f"{row['sparsek_ms']:7.2f} ms  x{row['speedup']:.2f} | graphs: full "
                  f"{row['full_graph_ms']:7.2f} ms  sparsek "
                  f"{row['sparsek_graph_ms']:6.2f} ms  x{row['speedup_graph']:.2f} | cache GB full "
                  f"{row['full_cache_gb']:.2f} sparsek {row['sparsek_cache_gb']:.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "topk": args.topk,
            "window": args.window, "steps": args.steps, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    _plot(rows, out.with_suffix(".png"), meta["gpu"])


def _plot(rows: list[dict], path: Path, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        ctx = [r["context"] for r in sel]
        for name, style in (("full", "--"), ("sparsek", "-"), ("full_graph", ":"), ("sparsek_graph", "-.")):
            ax_t.plot(ctx, [r[f"{name}_ms"] for r in sel], style, marker="o", label=f"{name}, batch {batch}")
            if not name.endswith("graph"):
                ax_m.plot(ctx, [r[f"{name}_cache_gb"] for r in sel], style, marker="o", label=f"{name}, batch {batch}")
    for ax, label in ((ax_t, "ms per decoded token (median)"), (ax_m, "KV cache GB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"Decoding, SmolLM2-135M shape, bf16, {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
