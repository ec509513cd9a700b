"""Training a language model from scratch: `train(TrainConfig, LMConfig)`, the same as `sparsek train`.

The batch of step s is a pure function of (seed, s), the learning rate a function of s, and the optimizer state is
checkpointed, so a run stopped at any checkpoint and resumed continues exactly as if it had not stopped, and
N processes under torchrun (each taking its share of the batch) follow the one-process run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..data.corpus import ByteTokenizer, DocumentSampler, load_documents, split_documents
from ..data.tasks import TaskMixer, check_mix, parse_tasks
from ..heldout import evaluate
from ..models import LMConfig, TransformerLM
from . import checkpoint, distributed
from .steps import StepLoop, Throughput, append_eval

# Settings that may change when a run is resumed (how long, how often); the rest must match the checkpoint.
RESUMABLE = ("steps", "max_minutes", "eval_every", "eval_tokens", "checkpoint_every", "log_every", "progress",
             "device")


@dataclass
class TrainConfig:
    """How to train. The context length, model size and attention variant live in `LMConfig`.

    batch_size is global (split across torchrun processes); the learning rate warms up linearly for
    warmup_steps and then follows a cosine to min_lr_ratio * lr at `steps`. precision "auto" is bf16 autocast
    on CUDA and float32 on CPU. max_minutes stops the run early with a checkpoint (resume later with the same
    run_dir). eval_tokens caps the held-out tokens of each evaluation (0: every held-out document, whole).
    Raising `steps` when resuming stretches the cosine from the current step on (the run is then not the one
    it would have been with the larger `steps` from the start). tasks ("passkey", "recall" or both,
    comma-separated) turns task_fraction of the training rows into long-range task examples written into the
    row's own text (`sparsek.data.tasks.TaskMixer`); "" trains on the text alone. overwrite starts afresh in a
    run_dir that already holds a run (deleting it) instead of resuming it; without it such a folder is resumed
    when it holds a checkpoint and refused otherwise. It is not saved: a later resume never overwrites.
    """

    run_dir: str = "runs/sparsek_window"
    data: str = "shakespeare"
    heldout_fraction: float = 0.1
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    eval_every: int = 0
    eval_tokens: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    max_minutes: float = 0.0
    progress: bool = True
    tasks: str = ""
    task_fraction: float = 0.5
    overwrite: bool = False

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("batch_size", "steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tasks:
            check_mix(parse_tasks(self.tasks), self.task_fraction)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to config.lr, then a cosine down to min_lr_ratio * lr at config.steps."""
    return config.lr * learning_rate_factor(config, step)


def learning_rate_factor(config, step: int) -> float:
    """The schedule as a factor of the peak rate: linear warmup to 1, then a cosine down to config.min_lr_ratio
    at config.steps (config: any with warmup_steps, steps and min_lr_ratio, e.g. TrainConfig, FinetuneConfig)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: when asked for, or with precision "auto" on a GPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def resolve_device(name: str, world: distributed.World) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and world.size > 1:
        if name != "cuda":
            raise ValueError(f"under torchrun each process takes the GPU of its LOCAL_RANK: use device 'cuda' or "
                             f"'auto', not {name!r}")
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def load_corpus(config: TrainConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(train, held-out) byte-token documents of config.data, split by document."""
    tokenizer = ByteTokenizer()
    splits = split_documents(load_documents(config.data), config.heldout_fraction)
    train_docs, heldout_docs = ([tokenizer.encode_tensor(d.text) for d in docs] for docs in splits)
    return train_docs, heldout_docs


def build_optimizer(model: TransformerLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and the scorer (whose zero start means "recency") do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "scorer" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def train(config: TrainConfig, model_config: LMConfig | None = None, *, resume: bool = True) -> dict:
    """Train (or resume) the run in config.run_dir; returns its summary (also saved in state.json).

    A run folder that holds a checkpoint is resumed when `resume` and not config.overwrite (its model config is
    used and the train config must agree apart from RESUMABLE settings); otherwise model_config is required and
    the run starts afresh, which a folder already holding run files allows only with config.overwrite.
    """
    run_dir = Path(config.run_dir)
    world = distributed.setup("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    device = resolve_device(config.device, world)
    if config.batch_size % world.size:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {world.size} processes")
    if world.main:
        checkpoint.recover(run_dir)  # one process finishes a stopped save before any reads the folder
    distributed.barrier(world)
    state, model_config = _starting_state(run_dir, config, model_config, resume)

    train_docs, heldout_docs = load_corpus(config)
    sampler = DocumentSampler(train_docs, model_config.context, config.batch_size, config.seed)
    mixer = None
    if config.tasks:
        mixer = TaskMixer(parse_tasks(config.tasks), config.task_fraction, ByteTokenizer().encode, config.seed)
        mixer.check_length(model_config.context + 1)
    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = TransformerLM(model_config).to(device)
    optimizer = build_optimizer(model, config)
    if state["step"]:
        checkpoint.load_weights(run_dir, model)
        checkpoint.load_optimizer(run_dir, optimizer, state)
        if world.main:
            checkpoint.truncate_metrics(run_dir, state["step"])
    elif world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_run_files(run_dir)  # an overwrite: nothing of the old run may mix with the new one
    trained = model
    if world.size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = uses_bf16(config.precision, device)
    autocast_dtype = torch.bfloat16 if use_bf16 else None

    def save(summary: dict | None = None) -> None:
        state.update(train=dataclasses.asdict(dataclasses.replace(config, overwrite=False)),
                     model=dataclasses.asdict(model_config),
                     parameters=model.num_parameters(), world_size=world.size)
        if summary is not None:
            state["summary"] = summary
        if world.main:
            checkpoint.save_checkpoint(run_dir, model, optimizer, state)

    def held_out(max_tokens: int) -> dict:
        return evaluate(model, heldout_docs, model_config.context, batch_size=max(1, config.batch_size),
                        max_tokens=max_tokens, autocast_dtype=autocast_dtype, progress=config.progress)

    started = time.perf_counter()  # the training time since then is not yet in state["train_seconds"]

    def save_progress() -> None:
        nonlocal started
        state["train_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        save()

    def out_of_time() -> bool:  # max_minutes counts from the latest checkpoint (or this run's start)
        return bool(config.max_minutes) and time.perf_counter() - started > 60 * config.max_minutes

    def loss(step: int) -> torch.Tensor:
        batch = sampler.batch(step, world.rank, world.size)
        if mixer is not None:
            batch = mixer(batch, step, world.rank, world.size)
        batch = batch.to(device, non_blocking=True)
        return trained(batch[:, :-1], batch[:, 1:]).mean()   # through DDP's forward, which syncs gradients

    model.train()
    finished = StepLoop(
        config, run_dir, optimizer, params=list(model.parameters()), loss=loss,
        lr_factor=partial(learning_rate_factor, config), peak_lrs=[config.lr] * len(optimizer.param_groups),
        lr_entry=lambda factor: {"lr": config.lr * factor}, device=device, bf16=use_bf16,
        tokens_per_step=config.batch_size * model_config.context, timer=Throughput(device),
        evaluate=lambda: held_out(config.eval_tokens), save_due=lambda step: step % config.checkpoint_every == 0,
        save=save_progress, desc=f"train {model_config.attention}", out_of_time=out_of_time, world=world).run(state)

    summary = None
    if finished:
        state["train_seconds"] += time.perf_counter() - started
        summary = {"finished": True, "step": state["step"], "tokens": state["tokens"],
                   "parameters": model.num_parameters()}
        if world.main:
            result = held_out(config.eval_tokens)
            rates = sorted(r["tokens_per_s"] for r in checkpoint.read_metrics(run_dir) if "tokens_per_s" in r)
            summary.update(eval_loss=result["loss"], eval_ppl=result["ppl"], eval_tokens=result["tokens"],
                           loss_by_position=result["loss_by_position"],
                           tokens_per_s=rates[len(rates) // 2] if rates else None)
            append_eval(run_dir, state["step"], state["tokens"], result)
        save(summary)
        if world.main:
            _plot(run_dir)
    distributed.barrier(world)
    distributed.teardown(world)
    return summary or {"finished": False, "step": state["step"], "tokens": state["tokens"]}


def _starting_state(run_dir: Path, config: TrainConfig, model_config: LMConfig | None,
                    resume: bool) -> tuple[dict, LMConfig]:
    """(state, model config) to start from: the checkpoint's when the run is resumed, else a fresh state.
    ValueError for a resume with other settings or another model, or a fresh start without a model config;
    RunExistsError for a fresh start over an existing run without config.overwrite."""
    if resume and not config.overwrite and (run_dir / checkpoint.STATE_FILE).is_file():
        state = checkpoint.load_state(run_dir)
        changed = checkpoint.changed_settings(TrainConfig(**state["train"]), config, RESUMABLE)
        if changed:
            raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}); use a new run_dir")
        saved_model = LMConfig(**state["model"])
        if model_config is not None and model_config != saved_model:
            raise ValueError(f"{run_dir} holds a different model ({saved_model}); use a new run_dir")
        state.pop("summary", None)  # written again when this run finishes
        return state, saved_model
    if model_config is None:
        raise ValueError(f"no checkpoint in {run_dir} to resume: pass a model config")
    if not config.overwrite and (found := checkpoint.existing_run_files(run_dir)):
        hint = ("pass resume=True to continue it, " if checkpoint.STATE_FILE in found
                else f"it cannot be resumed (no {checkpoint.STATE_FILE}): pass ")
        raise checkpoint.RunExistsError(f"{run_dir} already holds a run ({', '.join(found)}); {hint}--overwrite "
                                        f"(overwrite=True) to replace it, or use a new run_dir")
    return {"step": 0, "tokens": 0, "train_seconds": 0.0}, model_config


def _plot(run_dir: Path) -> None:
    try:
        from .plots import plot_run
    except ImportError as error:  # plots are an extra; the metrics are in the run folder to plot later
        print(f"no plots ({error}): pip install 'sparsek[training]'")
        return
    plot_run(run_dir)
