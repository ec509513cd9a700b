"""Scorer distillation: teach a converted model's scorers to keep what the original attention looks at.

    sparsek distill --model gemma3 --layers global --topk 512 --window 512 --context 8192 --steps 200
    distill(DistillConfig(model="smollm2", topk=256, window=256, context=2048, steps=200))

Why: fine-tuning on plain text gives the scorers no reason to keep a far fact, and the SPARSEK mask passes
gradient only to keys within 1 of the threshold, so a key far below it never learns that it matters. Here the
original model is the teacher. For each converted layer and KV head its signal is the attention mass each key
receives from the queries that see it outside their window (`sparsek.ops.teacher.teacher_mass`). The student
is the scorer's u = x . w + slope * t, and the loss is listwise: for query positions i every `stride` tokens,
the cross-entropy between the teacher's mass over i's candidates {j <= i - window}, normalised, and
softmax(u) over the same keys. Its gradient, softmax(u)_j - target_j, reaches every key, and its optimum is
u_j = log mass_j + const: the top-k of u is then the top-k of the teacher.

Only the scorers train; the model's own weights stay frozen, and one teacher forward (exact attention in every
layer, through `teacher_attention`) gives both the teacher's q, k and the scorer's input. The run folder holds
model/ (save_pretrained of the converted model with its distilled scorers, plus the tokenizer), state.json
(settings and summary: kept attention and ranking loss before and after) and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..layers.scorer import SLOPE_DISTILL
from ..ops.common import check_budget, check_sinks
from ..ops.select import prefix_selection
from ..ops.teacher import REDUCTIONS, kept_attention, teacher_mass
from . import checkpoint
from .loop import resolve_device, uses_bf16

TEACHER = "sparsek_teacher"
#: The teacher's reduction and the share of lookup rows that retrieve best on Gemma 3 270M (docs/longrange.md):
#: with "mean" or "sum", or without lookup rows, the distilled scorers miss facts beyond the window.
REDUCTION = "max"
LOOKUP = 1.0
SINK_LR = 0.1
SINK_MARGIN = 2.0


def ranking_loss(scores: Tensor, mass: Tensor, *, topk: int, window: int, stride: int, sinks: int = 0) -> Tensor:
    """Listwise distillation loss of one layer: scores [B, T, H] (the student's u, with grad), mass [B, T, H]
    (the teacher's, >= 0) -> scalar, the mean over (batch, head, query position) of the cross-entropy between
    mass and softmax(scores) over the candidates of query positions i = window + topk, + stride, ... (before
    that every candidate is selected, so nothing is to be learned).

    sinks: the first `sinks` keys (the attention sinks of pretrained models) leave the cross-entropy, whose
    optimum then ranks the other keys as before, and enter a margin term instead: softplus(SINK_MARGIN - (u_s -
    the best other candidate's u)), whose gradient reaches only the sinks' own scores. Then a sink is kept
    (mask 1) wherever it clears the margin, since tau never exceeds the best other score. On Gemma 3 this
    restores perplexity and costs far-context retrieval (docs/longrange.md)."""
    t_len = scores.shape[1]
    if window + topk >= t_len:
        return scores.sum() * 0
    queries = torch.arange(window + topk, t_len, stride, device=scores.device)
    keys = torch.arange(t_len, device=scores.device)
    candidate = (keys <= (queries - window)[:, None]) & (keys >= sinks)                      # [P, T]
    u = scores.float().transpose(1, 2)[:, :, None, :]                                          # [B, H, 1, T]
    log_p = torch.log_softmax(u.masked_fill(~candidate, -torch.inf), dim=-1)                    # [B, H, P, T]
    target = mass.float().transpose(1, 2)[:, :, None, :] * candidate
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
    loss = -(target * log_p.masked_fill(~candidate, 0)).sum(-1).mean()
    if sinks:
        best_other = u.detach().masked_fill(~candidate, -torch.inf).amax(-1, keepdim=True)     # [B, H, P, 1]
        loss = loss + torch.nn.functional.softplus(SINK_MARGIN - (u[..., :sinks] - best_other)).mean()
    return loss


@dataclass
class _Collector:
    """What the teacher attention gathers in one forward, per converted layer."""

    reduction: str
    stride: int
    sinks: int = 0
    measure: bool = False                 # also the share of attention the current scorers keep (no grad)
    losses: dict = dataclasses.field(default_factory=dict)
    kept: dict = dataclasses.field(default_factory=dict)
    first: dict = dataclasses.field(default_factory=dict)   # share of (row, head) whose key 0 is never evicted


_active: _Collector | None = None


def _teacher_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                       dropout: float = 0.0, sparsek_scores: Tensor | None = None, sparsek_layer=None, **kwargs):
    """The original model's exact attention in every layer; at converted layers it also scores the scorer.
    query [B, Hq, T, D], key, value [B, H, T, D] -> ([B, T, Hq, D], None)."""
    from ..integrations.hf import causal_attention

    out = causal_attention(query, key, value, attention_mask, scaling, kwargs.get("sliding_window"))
    if sparsek_scores is not None and _active is not None:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("distillation takes unpadded batches")
        settings = module.config.sparsek
        q, k = query.transpose(1, 2), key.transpose(1, 2)                                # [B, T, heads, D]
        mass = teacher_mass(q, k, window=settings["window"], reduction=_active.reduction, scale=scaling)
        _active.losses[module.layer_idx] = ranking_loss(sparsek_scores, mass, topk=settings["topk"],
                                                        window=settings["window"], stride=_active.stride,
                                                        sinks=_active.sinks)
        if _active.measure:
            topk, window = settings["topk"], settings["window"]
            _active.kept[module.layer_idx] = kept_attention(q, k, sparsek_scores, topk=topk, window=window,
                                                            scale=scaling).mean().item()
            end = prefix_selection(sparsek_scores.detach().float(), topk, window).end[:, 0]       # [B, H]
            _active.first[module.layer_idx] = (end == q.shape[1]).float().mean().item()
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ..integrations.hf import padding_mask

    AttentionInterface.register(TEACHER, _teacher_attention)
    AttentionMaskInterface.register(TEACHER, padding_mask)


@contextlib.contextmanager
def teacher_attention(model, reduction: str = REDUCTION, stride: int = 64, measure: bool = False, sinks: int = 0):
    """Within it, a converted model runs its original exact attention and collects per-layer distillation losses
    (ranking_loss; and with measure, the kept share of attention) into the yielded collector."""
    global _active
    if not getattr(model.config, "sparsek", None):
        raise ValueError("distillation needs a model converted with sparsek.integrations.hf.convert")
    _register()
    implementation = model.config._attn_implementation
    _active = _Collector(reduction, stride, sinks, measure)
    model.set_attn_implementation(TEACHER)
    try:
        yield _active
    finally:
        model.set_attn_implementation(implementation)
        _active = None


def _forward(model, ids: Tensor, autocast_dtype: torch.dtype | None) -> None:
    device = ids.device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)   # only the attention's side effects matter


@torch.no_grad()
def measure(model, batches: list[Tensor], *, reduction: str = REDUCTION, stride: int = 64, sinks: int = 0,
            autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean ranking loss and mean kept share of the original attention over the converted layers and batches
    (each [B, T] token ids on the model's device), and how often the first token (the attention sink of most
    pretrained models) stays selected to the end: {"loss", "kept", "kept_by_layer", "first_kept"}."""
    losses, kept, first = [], {}, []
    with teacher_attention(model, reduction, stride, measure=True, sinks=sinks) as collected:
        for ids in batches:
            _forward(model, ids, autocast_dtype)
            losses.append(torch.stack(list(collected.losses.values())).mean().item())
            for layer, share in collected.kept.items():
                kept.setdefault(layer, []).append(share)
            first += list(collected.first.values())
    by_layer = {layer: sum(v) / len(v) for layer, v in kept.items()}
    return {"loss": sum(losses) / len(losses), "kept": sum(by_layer.values()) / len(by_layer),
            "kept_by_layer": by_layer, "first_kept": sum(first) / len(first)}


def distill_scorers(model, batch: Callable[[int], Tensor], *, steps: int, lr: float = 3e-3,
                    reduction: str = REDUCTION, stride: int = 64, sinks: int = 0,
                    autocast_dtype: torch.dtype | None = None, progress: bool = True,
                    log: Callable[[dict], None] | None = None) -> list[float]:
    """Train only the scorers of a converted model for `steps` steps of Adam (cosine to 10% of lr); batch(step)
    gives [B, T] token ids on the model's device; sinks as in ranking_loss. Returns the loss of every step."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    scorers = [p for name, p in model.named_parameters() if "sparsek_scorer" in name]
    if not scorers:
        raise ValueError("the model has no SparseK scorers: convert it first")
    biases = [p for name, p in model.named_parameters() if "sparsek_scorer.sink_bias" in name]
    converted_sinks = (getattr(model.config, "sparsek", None) or {}).get("sinks", 0)
    if sinks != converted_sinks:
        raise ValueError(f"sinks={sinks}, but the model's scorers have sink biases for {converted_sinks} positions: "
                         "distill with the sinks the model was converted with (convert(..., sinks=n))")
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in scorers:
        p.requires_grad_(True)
    # Adam moves each parameter by about lr a step: the weight's steps are multiplied by x's scale, a sink bias's
    # are not, so the biases take SINK_LR to span the scores' range within a few hundred steps.
    optimizer = torch.optim.Adam([{"params": [p for p in scorers if all(p is not b for b in biases)], "base": lr},
                                  {"params": biases, "base": SINK_LR}])
    bar: Iterator[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="distill scorers", unit="step")
    history = []
    was_training = model.training
    model.eval()   # no dropout in the teacher
    try:
        with teacher_attention(model, reduction, stride, sinks=sinks) as collected:
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = group["base"] * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
                started = time.perf_counter()
                _forward(model, batch(step), autocast_dtype)
                loss = torch.stack(list(collected.losses.values())).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"distillation loss is {value} at step {step + 1}")
                history.append(value)
                if progress:
                    bar.set_postfix(loss=f"{value:.4f}")
                if log is not None:
                    log({"step": step + 1, "distill_loss": value, "seconds": time.perf_counter() - started})
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return history


def with_lookup_rows(batch: Callable[[int], Tensor], fraction: float, encode: Callable[[str], list[int]],
                     seed: int = 0) -> Callable[[int], Tensor]:
    """batch(step) -> [B, T] with each row, with probability `fraction`, replaced by a lookup row
    (`sparsek.data.ruler.make_lookup_row`) written over its own tokens as filler: facts that questions at the end
    of the row look back at. Plain text rarely makes a query attend far, so the teacher then has little to say
    about far facts. Deterministic in (seed, step)."""
    from ..data.ruler import make_lookup_row

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the lookup fraction must lie in [0, 1], got {fraction}")

    def mixed(step: int) -> Tensor:
        ids = batch(step)
        rng = random.Random(f"sparsek.distill:{seed}:{step}")
        rows = [make_lookup_row(row.tolist(), ids.shape[1], rng, encode).to(ids) if rng.random() < fraction
                else row for row in ids]
        return torch.stack(rows)

    return mixed


@dataclass
class DistillConfig:
    """Convert a pretrained model and distill its scorers (module docstring).

    model: "smollm2", "gemma3", a .gguf file, a checkpoint folder or a hub name. layers: "all", "global" (the
    full-attention layers of a model with local ones, such as Gemma 3) or comma-separated indices. slope: the
    scorer's recency term; 0 lets the distilled content alone rank the keys (ties still go to the newer key).
    reduction: how the teacher's mass of a key reduces over the queries that see it (ops/teacher). lookup: the
    share of training rows that carry facts asked about at their end (with_lookup_rows). stride: the
    spacing of the query positions whose candidate lists enter the loss. eval_batches: held-out batches on
    which the kept share of attention and the loss are measured before and after.
    """

    model: str = "smollm2"
    run_dir: str = "runs/distill"
    data: str = "shakespeare"
    heldout_fraction: float = 0.1
    topk: int = 256
    window: int = 256
    slope: float = SLOPE_DISTILL
    gate: str = "kv"
    layers: str = "all"
    context: int = 2048
    batch_size: int = 1
    steps: int = 200
    lr: float = 3e-3
    reduction: str = REDUCTION
    lookup: float = LOOKUP
    sinks: int = 0
    stride: int = 64
    eval_batches: int = 4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("context", "batch_size", "steps", "stride", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.lookup <= 1.0:
            raise ValueError(f"lookup must lie in [0, 1], got {self.lookup}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_budget(self.topk, self.window)
        if self.topk < 1:
            raise ValueError(f"distillation needs topk >= 1 (scorers to teach), got {self.topk}")
        check_sinks(self.sinks, self.topk)
        if self.context <= self.topk + self.window:
            raise ValueError(f"context {self.context} must exceed topk + window = {self.topk + self.window}: "
                             "shorter rows select every candidate and teach the scorers nothing")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        parse_layers(self.layers)


def parse_layers(text: str) -> list[int] | str | None:
    """"all" -> None, "global" -> "global", "0,3,5" -> [0, 3, 5] (what `convert` takes)."""
    text = text.strip()
    if text in ("all", "global"):
        return None if text == "all" else text
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise ValueError(f"layers must be 'all', 'global' or comma-separated indices >= 0, got {text!r}")
    return layers


# What a distillation run writes into its folder: a run refuses a folder holding any of them unless overwrite.
RUN_FILES = (checkpoint.STATE_FILE, checkpoint.METRICS_FILE, "model")


def distill(config: DistillConfig) -> dict:
    """Load, convert, distill, measure and save (module docstring); returns the summary."""
    from ..data.corpus import DocumentSampler
    from ..integrations.hf import convert
    from ..integrations.pretrained import bos_token_id, load_pretrained, prepend_bos
    from .distributed import World
    from .finetune import tokenized_corpus

    run_dir = Path(config.run_dir)
    found = checkpoint.existing_run_files(run_dir, RUN_FILES)   # checked before the model loads: fail at once
    if found and not config.overwrite:
        raise checkpoint.RunExistsError(f"{run_dir} already holds a run ({', '.join(found)}): pass --overwrite to "
                                        f"replace it, or use a new run_dir")
    device = resolve_device(config.device, World())
    use_bf16 = uses_bf16(config.precision, device)
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    torch.manual_seed(config.seed)
    model, tokenizer = load_pretrained(config.model, device=device)
    if getattr(model.config, "sparsek", None):
        raise ValueError(f"{config.model} is already a SparseK model: distill from the original it came from")
    convert(model, topk=config.topk, window=config.window, slope=config.slope, gate=config.gate,
            layers=parse_layers(config.layers), sinks=config.sinks)
    train_docs, heldout_docs = tokenized_corpus(config, tokenizer)
    bos = bos_token_id(model, tokenizer)
    length = config.context - 1 - (bos is not None)       # rows of `context` tokens, BOS included
    sampler = DocumentSampler(train_docs, length, config.batch_size, config.seed)
    heldout = DocumentSampler(heldout_docs, length, config.batch_size, config.seed + 1)
    eval_batches = [prepend_bos(heldout.batch(i), bos).to(device) for i in range(config.eval_batches)]
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_run_files(run_dir, RUN_FILES)   # nothing of a replaced run may mix with this one

    def check(name: str) -> dict:
        result = measure(model, eval_batches, reduction=config.reduction, stride=config.stride, sinks=config.sinks,
                         autocast_dtype=autocast_dtype)
        print(f"  {name:<10} ranking loss {result['loss']:.4f}, kept share of the original attention "
              f"{result['kept']:.4f} ({', '.join(f'{k}: {v:.3f}' for k, v in result['kept_by_layer'].items())}), "
              f"first token kept in {result['first_kept']:.0%} of rows")
        return result

    print(f"{config.model}: layers {model.config.sparsek['layers']} -> SparseK topk={config.topk} "
          f"window={config.window}, context {config.context}, {config.steps} distillation steps")
    summary = {"before": check("before")}
    started = time.perf_counter()
    rows = with_lookup_rows(sampler.batch, config.lookup, lambda text: tokenizer.encode(text, add_special_tokens=False),
                            config.seed)
    distill_scorers(model, lambda step: prepend_bos(rows(step), bos).to(device), steps=config.steps,
                    lr=config.lr,
                    reduction=config.reduction, stride=config.stride, sinks=config.sinks, autocast_dtype=autocast_dtype,
                    progress=config.progress, log=lambda row: checkpoint.append_metrics(run_dir, row))
    summary["seconds"] = time.perf_counter() - started
    summary["after"] = check("after")
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    checkpoint.save_state(run_dir, {"config": dataclasses.asdict(config), "summary": summary})
    return summary
