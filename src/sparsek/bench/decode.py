"""Decode benchmark: per-token latency, tokens per second and memory against context length, SparseK cache
against a full cache.

    python -m sparsek.bench.decode                      # GPU: SmolLM2-135M shape, batches 1, 8, 64
    python -m sparsek.bench.decode --device cpu --tiny  # a smoke test of every path that runs on a CPU

The model is a random LlamaForCausalLM of SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads of dim 64) in
bf16: decode speed does not depend on the weights. Each timed step decodes one token for every row (logits
for that token only). Three ways to run a step:
  * eager, as generate() does by default: the full cache is transformers' DynamicCache;
  * graph: the step captured once in a CUDA graph and replayed; the full cache is a StaticCache (attending
    over its preallocated length, as its compiled decoding does);
  * compiled: torch.compile(mode="reduce-overhead") of the step, what generate() with a compile_config runs
    (StaticCache for the full cache).
Two SparseK states per context:
  * synthetic (every batch): random keys, values and scores with the position counters at the context, and
    topk + 1 kept scores; the full cache is filled the same way (a real prefill of 128k x 64 would take
    minutes). A step reads the kept-score columns that candidates can have filled by its context (one per
    candidate, up to max_kept), so the synthetic state costs what a real one at that context does;
  * real (--real-batches): a prefill of random tokens through the converted model, so the kept scores, the
    slots and the window are what decoding really finds; the prefill's time is reported too.
--sparsek-contexts are timed for SparseK alone (constant memory is the point). A full cache that does not fit
shows as NaN; "full fits B" is the largest batch whose full cache fits in the free GPU memory. --generate times
generate() end to end at batch 1, eager and with a compile_config, original against converted, and checks that
the converted model's compiled and eager tokens match.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1 << 20,
                     tie_word_embeddings=True)
TINY_SHAPE = dict(SMOLLM2_SHAPE, vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
NAMES = ("full", "sparsek", "sparsek_real")
WAYS = ("eager", "graph", "compiled")


def _model(device: str, shape: dict):
    """The random model, SDPA attention (convert switches a copy to SparseK); bf16 on a GPU, float32 on a CPU."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    model.set_attn_implementation("sdpa")
    return model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_cache(model, batch: int, context: int, static: bool = False):
    """A full cache holding `context` random keys and values per layer: transformers' DynamicCache (what
    generate() uses), or a StaticCache with room for the timed steps (what its compiled decoding uses)."""
    from transformers import DynamicCache, StaticCache

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = StaticCache(config=config, max_cache_len=context + 64) if static else DynamicCache(config=config)
    positions = {"cache_position": torch.arange(context, device=model.device)}  # read by older StaticCaches
    for layer in range(config.num_hidden_layers):
        kv = torch.randn(2, batch, config.num_key_value_heads, context, head_dim, device=model.device,
                         dtype=model.dtype)
        cache.update(kv[0], kv[1], layer, positions)
    return cache


def sparsek_cache(model, batch: int, context: int):
    """A SparseKHFCache in the state it has after `context` tokens (random keys, values and scores)."""
    from ..cache import SparseKCache
    from ..integrations.hf import SparseKHFCache, mark_static

    config, settings = model.config, model.config.sparsek
    topk, window = settings["topk"], settings["window"]
    head_dim = config.hidden_size // config.num_attention_heads
    cache = SparseKHFCache()
    for layer_idx in range(config.num_hidden_layers):
        state = SparseKCache(batch, config.num_key_value_heads, head_dim, topk, window, model.dtype, model.device)
        state.keys.normal_()
        state.values.normal_()
        state.scores.normal_()
        state.positions.copy_(torch.arange(topk + window, device=model.device))  # every entry holds a token
        # topk + 1 kept scores (at most one per candidate so far, as SparseKCache keeps them), the rest empty
        state.kept_u[..., :min(topk + 1, max(context - window, 0))].normal_()
        state.lengths.fill_(context)
        mark_static(state)                               # as a real prefill does: compiled steps graph it
        layer = cache.layer(layer_idx)
        layer.state, layer.seen = state, context
    return cache


@torch.no_grad()
def real_sparsek_cache(model, batch: int, context: int) -> tuple:
    """(cache, prefill ms): a SparseKHFCache after a prefill of `context` random tokens through the model."""
    from ..integrations.hf import SparseKHFCache, cache_argument

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=model.device)
    cache = SparseKHFCache()
    _sync(model.device)
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    _sync(model.device)
    return cache, (time.perf_counter() - start) * 1e3


@torch.no_grad()
def time_decode(model, cache, batch: int, context: int, steps: int, how: str) -> list[float]:
    """Milliseconds of each decode step after warm-up. how: "eager"; "graph" (the step captured once in a CUDA
    graph and replayed: one launch per token instead of hundreds); "compiled" (torch.compile, reduce-overhead)."""
    from ..integrations.hf import cache_argument

    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    position = torch.full((batch, 1), context, device=model.device)

    def step(token, position):
        return model(token, position_ids=position, use_cache=True, logits_to_keep=1,
                     **{cache_argument(model): cache}).logits

    if how == "compiled":
        torch._dynamo.reset()                            # each cache compiles afresh, within the recompile limit
    run = torch.compile(step, mode="reduce-overhead") if how == "compiled" else step
    warm_up = 3 if how == "compiled" else 2              # compiled: the second call recompiles with the count dynamic
    if model.device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warm_up):
                run(token, position)
                position.add_(1)
        torch.cuda.current_stream().wait_stream(side)
    else:
        for _ in range(warm_up):
            run(token, position)
            position.add_(1)
    if how == "graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(token, position)
        run = lambda token, position: graph.replay()  # noqa: E731 -- the captured step reads its inputs in place
    times = []
    for _ in range(steps):
        _sync(model.device)
        start = time.perf_counter()
        run(token, position)
        position.add_(1)
        _sync(model.device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cache_bytes(cache) -> int:
    """Bytes the cache holds (keys, values and, for SparseK, its scores and counters)."""
    from ..integrations.hf import SparseKHFCache

    if isinstance(cache, SparseKHFCache):
        return sum(layer.state.nbytes() for layer in cache.layers)
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def full_cache_rows_fitting(model, context: int) -> int:
    """The largest batch whose full KV cache at `context` fits in the GPU's free memory (0 on a CPU)."""
    if model.device.type != "cuda":
        return 0
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_row = 2 * config.num_hidden_layers * config.num_key_value_heads * context * head_dim * model.dtype.itemsize
    return int(torch.cuda.mem_get_info(model.device)[0] // per_row)


@torch.no_grad()
def time_generate(model, context: int, new_tokens: int, compiled: bool) -> tuple[float, torch.Tensor, int]:
    """(ms per new token, the new tokens, graphs Dynamo compiled): generate() at batch 1 from `context` random
    tokens, timed as the difference between 8 + new_tokens and 8 new tokens (the median of three), so that the
    prefill and a new cache's first compiled steps (CUDA graphs recorded at its addresses) cancel out. compiled
    adds a compile_config (and, for an unconverted model, the static cache transformers compiles with);
    transformers falls back to eager steps, with a warning only, where its criteria fail, so the graph count
    tells."""
    import transformers

    torch.manual_seed(1)
    torch._dynamo.reset()
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if compiled:
        kwargs["compile_config"] = transformers.CompileConfig()
        if getattr(model.config, "sparsek", None) is None:
            kwargs["cache_implementation"] = "static"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.generate(ids, max_new_tokens=new_tokens + 8, **kwargs)         # warm-up: compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    per_token = []
    for _ in range(3):                                                     # the median of three differences
        elapsed = []
        for n in (8, new_tokens + 8):
            _sync(model.device)
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            _sync(model.device)
            elapsed.append(time.perf_counter() - start)
        per_token.append((elapsed[1] - elapsed[0]) * 1e3 / new_tokens)
    return statistics.median(per_token), out[0, context:], graphs


def decode_rows(full, sparse, args, ways: tuple) -> list[dict]:
    """One row per (batch, context): every (cache, way) that applies, its median ms and tokens per second."""
    contexts = [(int(c), True) for c in args.contexts.split(",") if c]
    contexts += [(int(c), False) for c in args.sparsek_contexts.split(",") if c]
    real_batches = {int(b) for b in args.real_batches.split(",") if b}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context, with_full in contexts:
            row = {"batch": batch, "context": context, "full_fits_batch": full_cache_rows_fitting(full, context)}
            runs = [("sparsek", sparse)] + [("sparsek_real", sparse)] * (batch in real_batches)
            runs += [("full", full)] * with_full
            for name, model in runs:
                for how in ways:
                    key, cache = f"{name}_{how}", None
                    if model.device.type == "cuda":
                        torch.cuda.empty_cache()
                    try:
                        if name == "sparsek_real":
                            cache, row["sparsek_prefill_ms"] = real_sparsek_cache(model, batch, context)
                        elif name == "full":
                            cache = full_cache(model, batch, context, static=how != "eager")
                        else:
                            cache = sparsek_cache(model, batch, context)
                        row[f"{key}_ms"] = statistics.median(time_decode(model, cache, batch, context, args.steps,
                                                                         how))
                        row[f"{key}_tokens_per_s"] = batch * 1e3 / row[f"{key}_ms"]
                        row[f"{name}_cache_gb"] = cache_bytes(cache) / 1e9
                    except Exception as error:  # noqa: BLE001 -- one failed variant must not hide the others
                        print(f"  {key} B={batch} T={context}: {type(error).__name__}: {str(error)[:300]}",
                              flush=True)
                        row[f"{key}_ms"] = row[f"{key}_tokens_per_s"] = float("nan")
                    cache = None
            rows.append(row)
            timed = {name: "/".join(f"{row[name + '_' + how + '_ms']:.2f}" for how in ways)
                     for name in NAMES if f"{name}_{ways[0]}_ms" in row}
            print(f"B={batch:<3} T={context:>7}  " + "  ".join(f"{name} {ms} ms" for name, ms in timed.items()),
                  flush=True)
    return rows


def generate_rows(full, sparse, args) -> list[dict]:
    """generate() at batch 1 per context in --generate: ms per new token, eager and compiled (on a GPU)."""
    rows = []
    for context in (int(c) for c in args.generate.split(",") if c):
        row, tokens = {"context": context}, {}
        for name, model in (("full", full), ("sparsek", sparse)):
            for compiled in (False, True) if model.device.type == "cuda" else (False,):
                key = f"{name}_{'compiled' if compiled else 'eager'}"
                try:
                    row[f"{key}_ms"], tokens[key], graphs = time_generate(model, context, args.steps, compiled)
                    if compiled:
                        row[f"{key}_graphs"] = graphs                    # 0: transformers did not compile
                except Exception as error:  # noqa: BLE001
                    print(f"  generate {key} T={context}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    row[f"{key}_ms"] = float("nan")
        if "sparsek_compiled" in tokens and "sparsek_eager" in tokens:
            row["sparsek_compiled_equals_eager"] = bool(torch.equal(tokens["sparsek_compiled"],
                                                                    tokens["sparsek_eager"]))
        rows.append(row)
        print(f"generate T={context}: {row}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--sparsek-contexts", default="524288", help="contexts timed for SparseK alone")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--real-batches", default="1,8", help="batches whose SparseK state also comes from a "
                        "real prefill")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generate", default="4096,65536", help="contexts of the generate() rows ('' for none)")
    parser.add_argument("--ways", default="eager,graph,compiled", help="comma-separated, of eager, graph and "
                        "compiled (a CPU runs eager alone)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 (smoke test)")
    parser.add_argument("--out", default="docs/bench/decode")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: pass --device cpu (eager rows only) for a smoke test")
    ways = tuple(w.strip() for w in args.ways.split(",") if w.strip())
    if not ways or set(ways) - set(WAYS):
        parser.error(f"--ways takes a comma-separated subset of {', '.join(WAYS)}, got {args.ways!r}")
    if args.device != "cuda":
        ways = ("eager",)
    from ..integrations.hf import convert

    shape = TINY_SHAPE if args.tiny else SMOLLM2_SHAPE
    full = _model(args.device, shape)
    sparse = convert(_model(args.device, shape), topk=args.topk, window=args.window)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "shape": shape, "topk": args.topk, "window": args.window,
              "steps": args.steps, "rows": decode_rows(full, sparse, args, ways)}
    result["generate"] = generate_rows(full, sparse, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    try:
        _plot(result["rows"], ways, out.with_suffix(".png"), result["device"])
    except ImportError as error:
        print(f"no plot ({error}): pip install matplotlib")
    _print_tables(result, ways)
    return result


def _print_tables(result: dict, ways: tuple) -> None:
    """ms per decoded token (median) per cache and way, tokens per second of the fastest way, cache sizes;
    then the generate() rows."""
    rows = result["rows"]
    print(f"\n{result['device']}, topk {result['topk']} + window {result['window']}, median ms per decoded token")
    header = ["batch", "context"] + [f"{n} {w}" for n in NAMES for w in ways]
    header += ["full tok/s", "sparsek tok/s", "full GB", "sparsek GB", "full fits B", "prefill ms"]
    print(" | ".join(header))
    def fastest(row: dict, name: str) -> str:
        rates = [row.get(f"{name}_{how}_tokens_per_s", float("nan")) for how in ways]
        rates = [r for r in rates if r == r]
        return f"{max(rates):.0f}" if rates else "-"

    for row in rows:
        cells = [str(row["batch"]), str(row["context"])]
        cells += [f"{row[f'{n}_{w}_ms']:.2f}" if f"{n}_{w}_ms" in row else "-" for n in NAMES for w in ways]
        cells += [fastest(row, "full"), fastest(row, "sparsek")]
        cells += [f"{row[k]:.3f}" if k in row else "-" for k in ("full_cache_gb", "sparsek_cache_gb")]
        cells += [str(row["full_fits_batch"]), f"{row['sparsek_prefill_ms']:.0f}" if "sparsek_prefill_ms" in row
                  else "-"]
        print(" | ".join(cells))
    for row in result["generate"]:
        print("generate() at batch 1, ms per new token: " + ", ".join(
            f"{k.removesuffix('_ms')} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def _plot(rows: list[dict], ways: tuple, path: Path, device: str) -> None:
    """ms per token (the last way, the fastest where CUDA graphs run) and cache size against context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    how = ways[-1]
    for batch in sorted({r["batch"] for r in rows}):
        for name, style in zip(NAMES, ("--", "-", ":")):
            points = [(r["context"], r[f"{name}_{how}_ms"]) for r in rows
                      if r["batch"] == batch and f"{name}_{how}_ms" in r]
            if points:
                ax_t.plot(*zip(*points), style, marker="o", label=f"{name} ({how}), batch {batch}")
            sizes = [(r["context"], r[f"{name}_cache_gb"]) for r in rows
                     if r["batch"] == batch and f"{name}_cache_gb" in r]
            if sizes and name != "sparsek_real":
                ax_m.plot(*zip(*sizes), style, marker="o", label=f"{name}, batch {batch}")
    for ax, label in ((ax_t, "ms per decoded token (median)"), (ax_m, "KV cache GB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Decoding, a random model of SmolLM2-135M's shape, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
