"""`sparsek eval`: every evaluation on any model, at one or more context lengths.

    sparsek eval runs/passkey/sparsek_window --context 2048,4096,8192   # a run trained here
    sparsek eval runs/finetune --context 2048                          # a `sparsek finetune` run
    sparsek eval smollm2 --context 2048                                # any transformers model, SparseK or not

At each context T: held-out perplexity, overall and by position (whole held-out documents cut into windows of
T), and passkey and associative-recall accuracy at distances from inside the window to the longest that fits in
T. Contexts beyond the training one measure length extrapolation. Results go to <out>/eval_<T>.json, with the
plots position_<T>.png and tasks_<T>.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..data.corpus import ByteTokenizer, load_documents
from ..data.tasks import TASKS, Encode
from ..heldout import TransformersLM, evaluate
from .longrange import default_distances, evaluate_tasks


@dataclass
class Subject:
    """A model to evaluate: `model` answers the tasks, `lm` gives token losses (the same module for our models),
    `encode` turns text into its tokens, `heldout` are its held-out documents (tokenized)."""

    name: str
    model: torch.nn.Module
    lm: torch.nn.Module
    encode: Encode
    heldout: list[Tensor]
    context: int | None = None                  # the training context, when known
    window: int | None = None                   # the sliding window, when there is one
    info: dict = field(default_factory=dict)


def load_subject(target: str, device: torch.device, data: str | None = None) -> Subject:
    """A run folder of `sparsek train`/`compare`, of `sparsek finetune`, or any transformers model.

    data None evaluates the held-out split the model was trained with (Shakespeare's for pretrained models,
    split like ours, so runs and models see the same works); a corpus name evaluates all its documents.
    """
    from ..train import checkpoint

    folder = Path(target)
    state = checkpoint.load_state(folder) if (folder / checkpoint.STATE_FILE).is_file() else None
    if state is not None and "model" in state and "train" in state:          # trained from scratch here
        from ..train.compare import load_model
        from ..train.loop import TrainConfig, load_corpus

        model = load_model(folder, device)
        encode = ByteTokenizer().encode
        heldout = load_corpus(TrainConfig(**state["train"]))[1] if data is None else _documents(data, encode)
        config = model.config
        window = {"window": config.budget, "sparsek_window": config.sparsek_budget()[1]}.get(config.attention)
        return Subject(folder.name, model, model, encode, heldout, config.context, window,
                       {"attention": config.attention, "budget": config.budget})

    from ..train.finetune import FinetuneConfig, tokenized_corpus

    if state is not None and "config" in state:                              # a fine-tuning run
        from ..train.finetune import load_finetuned

        config = FinetuneConfig(**state["config"])
        model, tokenizer = load_finetuned(folder)
        info = {"attention": config.attention, "topk": config.topk, "window": config.window, "base": config.model}
        window = config.window if config.attention == "sparsek" else None
    else:                                                                    # any transformers model
        from ..integrations.pretrained import load_pretrained
        model, tokenizer = load_pretrained(target)
        settings = getattr(model.config, "sparsek", None) or {}
        config, window = None, settings.get("window")
        info = {"attention": "sparsek" if settings else "original", **settings}
    model = model.to(device).eval()

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    if data is None:  # pretrained models: Shakespeare's held-out works, as `sparsek finetune` splits them
        heldout = tokenized_corpus(config or FinetuneConfig(), tokenizer)[1]
    else:
        heldout = _documents(data, encode)
    from ..integrations.pretrained import bos_token_id, with_bos
    model = with_bos(model, bos_token_id(model, tokenizer))     # Gemma scores only with its BOS first
    return Subject(folder.name or target, model, TransformersLM(model), encode, heldout,
                   config.context if config else None, window, info)


def _documents(data: str, encode: Encode) -> list[Tensor]:
    return [torch.tensor(encode(d.text), dtype=torch.long) for d in load_documents(data)]


def evaluate_subject(subject: Subject, contexts: list[int], out_dir: str | Path, *, tasks: tuple[str, ...] = TASKS,
                     distances: list[int] | None = None, examples: int = 32, max_tokens: int = 0,
                     batch_size: int = 4, seed: int = 0, progress: bool = True, suite: bool = False,
                     depths: list[float] | None = None) -> dict[int, dict]:
    """Perplexity and task accuracy at each context; writes eval_<T>.json and plots into out_dir.

    suite: also the RULER-style suite of `sparsek.eval.ruler` (examples per task and depth, at `depths`).
    Returns {T: {"perplexity": evaluate(...) output, "tasks": evaluate_tasks(...) output, "suite": ...}}.
    """
    # Checked before the first context's perplexity, which can take minutes.
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"tasks must be among {TASKS}, got {unknown}")
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive lengths, got {contexts}")
    if tasks and examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(subject.model.parameters()).device
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    results = {}
    for context in contexts:
        perplexity = evaluate(subject.lm, subject.heldout, context, batch_size=batch_size, max_tokens=max_tokens,
                              autocast_dtype=autocast_dtype, progress=progress)
        task_results = {}
        if tasks:
            points = distances or default_distances(context + 1, subject.window)
            task_results = evaluate_tasks(subject.model, subject.heldout, subject.encode, length=context + 1,
                                          distances=points, tasks=tasks, examples=examples, seed=seed,
                                          batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress)
        result = {"name": subject.name, "context": context, "trained_context": subject.context,
                  "window": subject.window, **subject.info, "perplexity": perplexity, "tasks": task_results}
        if suite:
            from ..data.ruler import DEPTHS
            from .ruler import evaluate_suite
            result["suite"] = evaluate_suite(subject.model, subject.heldout, subject.encode, length=context + 1,
                                             depths=depths or DEPTHS, examples=examples, seed=seed,
                                             batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress)
        (out_dir / f"eval_{context}.json").write_text(json.dumps(result))
        _plots(result, out_dir)
        results[context] = result
        print(format_result(result), flush=True)
    return results


def format_result(result: dict) -> str:
    """A few lines: perplexity, then accuracy against distance per task."""
    ppl = result["perplexity"]
    trained = f" (trained at {result['trained_context']})" if result.get("trained_context") else ""
    lines = [f"{result['name']}: context {result['context']}{trained}: held-out loss {ppl['loss']:.4f}, "
             f"ppl {ppl['ppl']:.3f} over {ppl['tokens']:,} tokens"]
    for task, rows in result["tasks"].items():
        cells = "  ".join(f"{r['distance']}:{r['accuracy']:.2f}" for r in rows)
        lines.append(f"  {task:<8} accuracy by distance  {cells}")
    for task, rows in result.get("suite", {}).items():
        if task == "average":
            lines.append(f"  suite average {rows:.3f}")
        else:
            cells = "  ".join(f"{r['depth']}:{r['accuracy']:.2f}" for r in rows)
            lines.append(f"  {task:<10} accuracy by depth  {cells}")
    return "\n".join(lines)


def _plots(result: dict, out_dir: Path) -> None:
    try:
        from ..train.plots import plot_position
        from .plots import plot_task_accuracy
    except ImportError as error:  # plots are an extra
        print(f"no plots ({error}): pip install 'sparsek[training]'")
        return
    context = result["context"]
    plot_position({result["name"]: result["perplexity"]["loss_by_position"]}, out_dir / f"position_{context}.png",
                  window=result.get("window"))
    if result["tasks"]:
        plot_task_accuracy({result["name"]: result["tasks"]}, out_dir / f"tasks_{context}.png",
                           window=result.get("window"), title=f"context {context}")
