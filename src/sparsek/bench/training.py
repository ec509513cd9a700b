"""Training throughput of the language model per attention variant and context length, on one GPU.

    python -m sparsek.bench.training                                   # T = 4k, 16k, 32k; all six variants
    python -m sparsek.bench.training --contexts 4096 --attention full sparsek_window --steps 5

Setup: the model of `LMConfig` (sizes below), budget = T / 8 keys per query for the sparse variants (as in the
quality runs of docs/training.md) or a fixed --budget (linear in T: the long-context case), bf16
autocast, AdamW, random byte tokens, tokens_per_step = batch * T kept equal across T (so longer contexts run
smaller batches). Each row: --warmup steps untimed (compiles FlexAttention, fills the autotune caches), then the
median over --steps steps of one forward + backward + optimizer step, timed with CUDA events; tokens/s =
tokens_per_step / median. Peak MB is torch.cuda.max_memory_allocated over the timed steps.
A variant that runs out of GPU memory is reported as OOM. Writes <out>/training.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..models import VARIANTS, LMConfig, TransformerLM


def time_steps(model: TransformerLM, tokens: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each timed training step (forward, backward, AdamW) on the batch tokens [B, T + 1]."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.token_losses(tokens).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--attention", nargs="+", default=list(VARIANTS), choices=tuple(VARIANTS))
    parser.add_argument("--budget", type=int, default=0, help="keys per query of the sparse variants (0: T / 8)")
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="runs/bench_training")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for context in args.contexts:
        batch = max(1, args.tokens_per_step // context)
        tokens = torch.randint(0, 256, (batch, context + 1), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(0))
        for attention in args.attention:
            torch.manual_seed(0)
            config = LMConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                              n_kv_heads=args.n_kv_heads, attention=attention, budget=args.budget or context // 8,
                              context=context)
            model = TransformerLM(config).cuda()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            row = {"context": context, "batch": batch, "attention": attention, "budget": config.budget,
                   "parameters": model.num_parameters()}
            try:
                median = statistics.median(time_steps(model, tokens, args.warmup, args.steps))
                row.update(ms_per_step=median, tokens_per_s=batch * context / median * 1e3,
                           peak_mb=torch.cuda.max_memory_allocated() / 2**20, wall_s=time.perf_counter() - started)
            except torch.OutOfMemoryError:
                row.update(oom=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "training.json").write_text(json.dumps(rows, indent=1))
            del model
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, d_model {args.d_model}, {args.n_layers} layers, heads "
          f"{args.n_heads}/{args.n_kv_heads}, {args.tokens_per_step} tokens per step, bf16\n")
    print("| T | attention | budget | ms/step | tokens/s | vs full | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("oom"):
            print(f"| {row['context']} | {row['attention']} | {row['budget']} | OOM | | | |")
            continue
        full = next((r for r in rows if r["context"] == row["context"] and r["attention"] == "full"
                     and not r.get("oom")), None)
        ratio = f"{row['tokens_per_s'] / full['tokens_per_s']:.2f}x" if full else ""
        print(f"| {row['context']} | {row['attention']} | {row['budget']} | {row['ms_per_step']:.1f} "
              f"| {row['tokens_per_s']:,.0f} | {ratio} | {row['peak_mb']:,.0f} |")


if __name__ == "__main__":
    main()
