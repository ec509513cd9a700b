"""Far context on a pretrained model: SparseK (zero, distilled) against constant-memory peers at one KV budget.

    python -m sparsek.eval.farcontext --model gemma3 --layers global --topk 512 --window 512 \
        --contexts 4096,8192,16384 --examples 8 --distill-steps 200 --out runs/farcontext
    python -m sparsek.eval.farcontext --model smollm2 --topk 256 --window 256 --contexts 2048 --out runs/fc_smollm2

Methods (--methods, in this order by default):
  original   the model as it ships: full attention, the ceiling
  zero       converted (`layers`), scorers at zero: with slope 0 every score ties and the newest keys win, so
             this is a sliding window of topk + window
  distilled  converted, scorers distilled from the original attention (`sparsek.train.distill`), one row per
             --reductions entry ("distilled" for the first, "distilled_<reduction>" for the others)
  --runs NAME=FOLDER   models already converted elsewhere, such as `sparsek finetune` runs, scored as they are
  streaming_llm, h2o, snapkv   the peers of `sparsek.integrations.peers`, compressing the same layers to the same
             budget of topk + window KV pairs per layer and KV head
For every method and context: the RULER-style suite (`sparsek.eval.ruler`) and, for the methods that run in
parallel (original and SparseK), held-out perplexity at --ppl-context. For SparseK, the KV bytes of its cache after
prefills of two lengths (constant memory, measured from the cache tensors). The peers compress the cache after a
full-attention prefill of all but the last --tail tokens; the tail (question, answer and a little text) then
attends to the compressed cache, as kvpress evaluates them.

Results go to <out>/results.json, one entry per (method, context), written as each finishes: a second run with the
same --out skips what is done (long jobs resume). Distilled scorers are saved to <out>/scorers_<reduction>.pt and
reused. A table is printed last; <out>/suite.png plots accuracy against depth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..data.corpus import DocumentSampler
from ..data.ruler import SUITE
from ..heldout import TransformersLM, evaluate
from ..integrations.pretrained import bos_token_id, load_pretrained, prepend_bos, with_bos
from ..layers.scorer import SLOPE_CONVERT, SLOPE_DISTILL
from ..ops.teacher import REDUCTIONS
from ..train.distill import LOOKUP, REDUCTION, distill_scorers, measure, parse_layers, with_lookup_rows
from ..train.distributed import World
from ..train.loop import resolve_device
from .ruler import evaluate_suite

PEERS = ("streaming_llm", "h2o", "snapkv")
METHODS = ("original", "zero", "distilled", *PEERS)
DISTILL_STEPS, DISTILL_CONTEXT, DISTILL_LR = 200, 8192, 3e-3


def _load_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load(args, device):
    return load_pretrained(args.model, dtype=_load_dtype(device),
                           device=device, cache_dir=args.cache_dir, tokenizer=args.tokenizer)


def _convert(model, args):
    from ..integrations.hf import convert
    return convert(model, topk=args.topk, window=args.window, slope=args.slope, layers=parse_layers(args.layers),
                   sinks=args.distill_sinks)


class CompressedTail(torch.nn.Module):
    """A model compressed by a peer method, scored as kvpress does: forward(input_ids [B, T]) prefills all but
    the last `tail` tokens with exact attention into a PeerCache (which then keeps its budget), feeds the tail
    through it, and returns the tail's logits (logits_to_keep of them, at most `tail`)."""

    def __init__(self, model, tail: int):
        super().__init__()
        self.model, self.tail = model, tail

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs):
        from ..integrations.hf import cache_argument
        from ..integrations.peers import PeerCache

        if not 0 < logits_to_keep <= self.tail < input_ids.shape[1]:
            raise ValueError(f"CompressedTail scores 1 to tail={self.tail} last tokens of a longer input, got "
                             f"logits_to_keep={logits_to_keep} for {input_ids.shape[1]} tokens")
        cache = {cache_argument(self.model): PeerCache()}
        self.model(input_ids[:, :-self.tail], use_cache=True, logits_to_keep=1, **cache)
        return self.model(input_ids[:, -self.tail:], use_cache=True, logits_to_keep=logits_to_keep, **cache)


def _distill_setting(args) -> str:
    """The part of a saved scorers file's name that says how they were distilled: a rerun with other settings
    distills again instead of reusing them. (Lookup share always named when not 0, the rest only when changed.)"""
    parts = [f"_lookup{args.distill_lookup:g}"] if args.distill_lookup else []
    for flag, value, default in (("ctx", args.distill_context, DISTILL_CONTEXT), ("sinks", args.distill_sinks, 0),
                                 ("steps", args.distill_steps, DISTILL_STEPS), ("lr", args.distill_lr, DISTILL_LR)):
        if value != default:
            parts.append(f"_{flag}{value:g}")
    return "".join(parts)


def _kv_bytes(model, ids: torch.Tensor) -> list[int]:
    """KV bytes of a SparseKHFCache after prefills of half and all of ids [1, T]."""
    from ..integrations.hf import SparseKHFCache, cache_argument
    sizes = []
    for n in (ids.shape[1] // 2, ids.shape[1]):
        cache = SparseKHFCache()
        with torch.no_grad():
            model(ids[:, :n], use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        sizes.append(cache.kv_bytes())
    return sizes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--data", default="shakespeare", help="corpus: distillation data and held-out filler")
    parser.add_argument("--layers", default="global", help="all, global or comma-separated layer indices")
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--slope", type=float, default=SLOPE_DISTILL, help="the distilled scorers' recency slope")
    parser.add_argument("--zero-slope", type=float, default=SLOPE_CONVERT, help="zero scorers: slope >= 1 makes "
                        "the mask hard (the newest keys, weight 1); at 0 every score ties and every candidate gets k/n")
    parser.add_argument("--sharpen", type=float, default=1.0, help="multiply distilled scorers by this: the same "
                        "ranking, a steeper SPARSEK mask (fewer keys with a fractional weight)")
    parser.add_argument("--tag", default="", help="appended to every method's name in the results")
    parser.add_argument("--contexts", default="4096,8192,16384")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", default=",".join(SUITE))
    parser.add_argument("--examples", type=int, default=8, help="examples per task and depth")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS)
    parser.add_argument("--distill-context", type=int, default=DISTILL_CONTEXT)
    parser.add_argument("--distill-lr", type=float, default=DISTILL_LR)
    parser.add_argument("--distill-lookup", type=float, default=LOOKUP, help="share of distillation rows with "
                        "lookup facts and questions (sparsek.data.ruler.make_lookup_row; not suite tasks)")
    parser.add_argument("--distill-sinks", type=int, default=0, help="the first positions, which get a scorer "
                        "bias of their own and are taught to rank first (sparsek.train.distill.ranking_loss)")
    parser.add_argument("--reductions", default=REDUCTION, help=f"comma-separated, of {REDUCTIONS}")
    parser.add_argument("--ppl-context", type=int, default=8192)
    parser.add_argument("--ppl-tokens", type=int, default=65536)
    parser.add_argument("--runs", default="", help="NAME=FOLDER,...: SparseK models saved elsewhere (a `sparsek "
                        "finetune` run folder or its model/), scored as they are")
    parser.add_argument("--tail", type=int, default=64, help="peers: tokens fed after compressing the prefill")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM's sink tokens")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cache-dir", default=None, help="where a GGUF model's de-quantized copy is kept")
    parser.add_argument("--tokenizer", default=None, help="a folder whose tokenizer replaces the model's (one "
                        "saved by a transformers version that converts a GGUF's tokenizer correctly)")
    parser.add_argument("--out", default="runs/farcontext")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = resolve_device(args.device, World())
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    reductions = [r.strip() for r in args.reductions.split(",") if r.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS] + [r for r in reductions if r not in REDUCTIONS]
    if unknown:
        raise ValueError(f"unknown methods or reductions {unknown}: methods are {METHODS}, reductions {REDUCTIONS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    from ..train.finetune import FinetuneConfig, tokenized_corpus
    model, tokenizer = _load(args, device)
    train_docs, heldout = tokenized_corpus(FinetuneConfig(data=args.data), tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def record(key: str, row: dict) -> None:
        results[key] = row
        results_file.write_text(json.dumps(results, indent=1))

    bos = bos_token_id(model, tokenizer)
    print(f"{args.model}: inputs start with BOS {bos}" if bos is not None else f"{args.model}: no BOS token")

    def suite_and_ppl(name: str, net, parallel: bool) -> None:
        net, name = with_bos(net, bos), name + args.tag
        for context in contexts:
            key = f"{name}@{context}"
            if key in results:
                continue
            started = time.perf_counter()
            row = {"method": name, "context": context,
                   "suite": evaluate_suite(net, heldout, encode, length=context, tasks=tasks, depths=depths,
                                           examples=args.examples, batch_size=args.batch_size,
                                           autocast_dtype=autocast_dtype, progress=True)}
            if parallel and context == args.ppl_context:
                ppl = evaluate(TransformersLM(net), heldout, context, batch_size=1, max_tokens=args.ppl_tokens,
                               autocast_dtype=autocast_dtype)
                row["ppl"] = ppl["ppl"]
            row["seconds"] = time.perf_counter() - started
            record(key, row)
            print(f"{key}: suite average {row['suite']['average']:.3f}"
                  + (f", ppl {row['ppl']:.3f}" if "ppl" in row else ""), flush=True)

    if "original" in methods:
        suite_and_ppl("original", model, parallel=True)
    if "zero" in methods or "distilled" in methods:
        _convert(model, args)
        scorers = [m for name, m in model.named_modules() if name.endswith("sparsek_scorer")]
        if "zero" in methods:
            for scorer in scorers:
                scorer.slope = args.zero_slope
            suite_and_ppl("zero", model, parallel=True)
            for scorer in scorers:
                scorer.slope = args.slope
            sample = max(heldout, key=len)[: max(contexts)][None].to(device)
            lengths = f"{sample.shape[1] // 2},{sample.shape[1]}"
            if lengths not in results.get("kv_bytes", {}):    # measured once: a resumed run skips it too
                record("kv_bytes", {**results.get("kv_bytes", {}), lengths: _kv_bytes(model, sample)})
        if "distilled" in methods:
            sampler = DocumentSampler(train_docs, args.distill_context - 2, 1, seed=0)
            probe = DocumentSampler(heldout, args.distill_context - 2, 1, seed=1)

            lookup = with_lookup_rows(sampler.batch, args.distill_lookup, encode)

            def rows(source, step):  # [1, distill_context], BOS first when the model has one
                ids = lookup(step) if source is sampler else source.batch(step)
                return prepend_bos(ids, bos).to(device)

            probes = [rows(probe, i) for i in range(4)]
            setting = _distill_setting(args)
            for reduction in reductions:
                name = "distilled" if reduction == reductions[0] else f"distilled_{reduction}"
                saved = out / f"scorers_{reduction}{setting}.pt"
                for parameter in (p for scorer in scorers for p in scorer.parameters()):
                    torch.nn.init.zeros_(parameter)
                if saved.is_file():
                    for scorer, state in zip(scorers, torch.load(saved)):
                        scorer.load_state_dict(state if isinstance(state, dict) else {"weight": state})
                else:
                    before = measure(model, probes, reduction=reduction, sinks=args.distill_sinks,
                                     autocast_dtype=autocast_dtype)
                    started = time.perf_counter()
                    losses = distill_scorers(model, lambda step: rows(sampler, step), steps=args.distill_steps,
                                    lr=args.distill_lr, reduction=reduction, sinks=args.distill_sinks,
                                    autocast_dtype=autocast_dtype)
                    seconds = time.perf_counter() - started
                    after = measure(model, probes, reduction=reduction, sinks=args.distill_sinks,
                                    autocast_dtype=autocast_dtype)
                    torch.save([{k: v.cpu() for k, v in s.state_dict().items()} for s in scorers], saved)
                    record(f"distill_{reduction}{setting}", {"before": before, "after": after, "seconds": seconds,
                                                    "steps": args.distill_steps, "losses": losses[::10]})
                    print(f"distilled ({reduction}, {seconds:.0f} s): kept attention {before['kept']:.3f} -> "
                          f"{after['kept']:.3f}, ranking loss {before['loss']:.3f} -> {after['loss']:.3f}, "
                          f"first token kept {before['first_kept']:.0%} -> {after['first_kept']:.0%}", flush=True)
                for parameter in (p for scorer in scorers for p in scorer.parameters()):
                    parameter.data.mul_(args.sharpen)
                suite_and_ppl(name, model, parallel=True)
    for name, folder in (item.split("=", 1) for item in args.runs.split(",") if item.strip()):
        folder = Path(folder) / "model" if (Path(folder) / "model").is_dir() else Path(folder)
        run, _ = load_pretrained(str(folder), dtype=_load_dtype(device), device=device)
        if not getattr(run.config, "sparsek", None):
            raise ValueError(f"--runs takes SparseK models; {folder} is not one")
        suite_and_ppl(name, run, parallel=True)
        del run
    peers = [m for m in methods if m in PEERS]
    if peers:
        from ..integrations.peers import compress
        if "zero" in methods or "distilled" in methods:
            model, _ = _load(args, device)      # convert changed the model in place
        for peer in peers:
            compress(model, peer, args.topk + args.window, layers=parse_layers(args.layers), sinks=args.sinks)
            suite_and_ppl(peer, CompressedTail(model, args.tail), parallel=False)
    print_table(results, contexts)
    try:
        plot_suite(results, out / "suite.png")
    except ImportError as error:
        print(f"no plot ({error}): pip install 'sparsek[training]'")
    return results


def print_table(results: dict, contexts: list[int]) -> None:
    """Suite average per method and context, perplexity where measured."""
    names = list(dict.fromkeys(r["method"] for k, r in results.items() if "@" in k))
    print(f"\n{'method':<20}" + "".join(f"{'suite@' + str(c):>13}" for c in contexts) + f"{'ppl':>9}")
    for name in names:
        cells = [results.get(f"{name}@{c}", {}).get("suite", {}).get("average") for c in contexts]
        ppl = next((r["ppl"] for k, r in results.items() if "@" in k and r["method"] == name and "ppl" in r), None)
        print(f"{name:<20}" + "".join(f"{c:>13.3f}" if c is not None else f"{'-':>13}" for c in cells)
              + (f"{ppl:>9.3f}" if ppl is not None else f"{'-':>9}"))


def plot_suite(results: dict, path: Path) -> None:
    """Accuracy against depth, one column per context: the suite average (top) and passkey alone (bottom, the
    task a small model can do at all), a line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for k, r in results.items() if "@" in k]
    contexts = sorted({r["context"] for r in rows})
    passkey_only = all(set(r["suite"]) == {"passkey", "average"} for r in rows)   # the two rows would be the same
    methods = list(dict.fromkeys(r["method"] for r in rows))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    color = {m: palette(i % palette.N) for i, m in enumerate(methods)}   # one colour per method in every panel
    n_rows = 1 if passkey_only else 2
    fig, axes = plt.subplots(n_rows, len(contexts), figsize=(5 * len(contexts), 3.5 * n_rows), squeeze=False,
                             layout="constrained")
    for column, context in enumerate(contexts):
        for row in (r for r in rows if r["context"] == context):
            per_task = {k: v for k, v in row["suite"].items() if k != "average"}
            cells = next(iter(per_task.values()))
            depths = [cell["depth"] for cell in cells]
            mean = [sum(t[i]["accuracy"] for t in per_task.values()) / len(per_task) for i in range(len(depths))]
            style = {"marker": "o", "label": row["method"], "color": color[row["method"]]}
            axes[0][column].plot(depths, mean, **style)
            if "passkey" in per_task and not passkey_only:
                axes[1][column].plot(depths, [c["accuracy"] for c in per_task["passkey"]], **style)
        for ax, what in zip(axes[:, column], ("passkey",) if passkey_only else ("suite average", "passkey")):
            ax.set(title=f"{what}, context {context}", xlabel="depth of the needed fact (0 = first token)",
                   ylabel="accuracy", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
    handles = {line.get_label(): line for ax in axes.flat for line in ax.get_lines()}   # methods missing somewhere too
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)

if __name__ == "__main__":
    main()
