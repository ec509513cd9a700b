"""Long-range ability: passkey and associative-recall accuracy against distance, for any causal LM.

A model here is either a `TransformerLM` or a transformers causal LM (only its last logits are computed).
Examples come from `sparsek.data.tasks`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from ..data.tasks import TASKS, Encode, TaskExample, distance_range, make_examples
from ..models import TransformerLM


def last_logits(model: torch.nn.Module, ids: Tensor, n: int) -> Tensor:
    """Logits of the last n positions [B, n, V]; transformers models are asked for those only (vocab is large)."""
    if isinstance(model, TransformerLM):
        return model(ids)[:, -n:]
    return model(ids, logits_to_keep=n, use_cache=False).logits[:, -n:]


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, examples: list[TaskExample], *, batch_size: int = 8,
                    autocast_dtype: torch.dtype | None = None) -> dict:
    """Share of examples whose every answer token is the argmax prediction ("accuracy") and share of answer
    tokens predicted ("token_accuracy"), with teacher forcing: greedy decoding of the answer agrees exactly.
    Examples may differ in length and answer length (they are batched by both)."""
    if not examples:
        raise ValueError("no examples to score")
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    # Batches of one (length, answer length): a subword tokenizer splits keys and numbers into varying counts.
    groups: dict[tuple[int, int], list[TaskExample]] = {}
    for example in examples:
        groups.setdefault((example.tokens.numel(), example.answer_length), []).append(example)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    correct = tokens_correct = tokens_total = 0
    for chunk in batches:
        n = chunk[0].answer_length
        tokens = torch.stack([e.tokens for e in chunk]).to(device)           # [b, L]
        with autocast:
            logits = last_logits(model, tokens[:, :-1], n)                     # predicts tokens[:, -n:]
        hits = logits.argmax(-1) == tokens[:, -n:]                             # [b, n]
        correct += int(hits.all(-1).sum())
        tokens_correct += int(hits.sum())
        tokens_total += hits.numel()
    return {"accuracy": correct / len(examples), "token_accuracy": tokens_correct / tokens_total,
            "examples": len(examples)}


def default_distances(length: int, window: int | None = None) -> list[int]:
    """Distances from inside the window to the longest that fits (in bytes, the longest tokenization): powers of
    two from 16, the window's edges when one is given, and the longest. Tasks skip those too short for their
    question."""
    longest = min(distance_range(task, length, lambda s: list(s.encode()))[1] for task in TASKS)
    points = {d for d in (2 ** i for i in range(4, 40)) if d <= longest}
    if window:
        points |= {d for d in (window // 2, window + 16) if 16 <= d <= longest}
    return sorted(points | {longest})


def evaluate_tasks(model: torch.nn.Module, documents: list[Tensor], encode: Encode, *, length: int,
                   distances: list[int], tasks: tuple[str, ...] = TASKS, examples: int = 32, seed: int = 0,
                   batch_size: int = 8, autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Accuracy of each task at each distance, examples of `length` tokens with filler from `documents`.

    Returns {task: [{"distance", "accuracy", "token_accuracy", "examples"}, ...]} in the order of `distances`.
    Distances that do not fit the task at this length (see `distance_range`) are skipped.
    """
    was_training = model.training
    model.eval()
    ranges = {task: distance_range(task, length, encode) for task in tasks}
    jobs = [(task, d) for task in tasks for d in distances if ranges[task][0] <= d <= ranges[task][1]]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="tasks", unit="distance", leave=False)
    results: dict[str, list[dict]] = {task: [] for task in tasks}
    for task, distance in jobs:
        batch = make_examples(task, documents, length, distance, examples, seed, encode)
        row = answer_accuracy(model, batch, batch_size=batch_size, autocast_dtype=autocast_dtype)
        results[task].append({"distance": distance, **row})
    model.train(was_training)
    return results

