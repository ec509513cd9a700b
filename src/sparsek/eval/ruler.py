"""RULER-style suite scores: accuracy of each task of `sparsek.data.ruler` at each depth, for any causal LM.

    results = evaluate_suite(model, heldout, encode, length=4096)
    results["vartrack"]   # [{"depth": 0.1, "distance": 3702.4, "accuracy": 0.75, "token_accuracy": 0.9,
                          #   "examples": 16}, ...] in the order of `depths`
    results["average"]    # accuracy averaged over depths, then over tasks

A model is a `TransformerLM` or a transformers causal LM, scored with teacher forcing by
`sparsek.eval.longrange.answer_accuracy` (an example counts when every answer token is the argmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..data.ruler import DEPTHS, SUITE, make_suite
from ..data.tasks import Encode
from .longrange import answer_accuracy


@torch.no_grad()
def evaluate_suite(model: torch.nn.Module, documents: Sequence[Tensor], encode: Encode, *, length: int,
                   tasks: Sequence[str] = SUITE, depths: Sequence[float] = DEPTHS, examples: int = 16, seed: int = 0,
                   batch_size: int = 8, autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Accuracy of each task at each depth, `examples` examples of `length` tokens per cell.

    Args:
        model: the model to score; put in eval mode for the duration.
        documents: held-out token ids [n_i] for the filler; those shorter than `length` are not used.
        encode: text -> token ids, the model's tokenizer.
        length: tokens per example, answer included.
        tasks, depths: names in SUITE; depths in [0, 1] of the first needed fact.
        examples, seed: examples per (task, depth), and the seed they are drawn from (see `make_suite`).
        batch_size, autocast_dtype: passed to `answer_accuracy`.
        progress: show a progress bar over (task, depth) cells.

    Returns {task: [{"depth", "distance" (mean over the examples), "accuracy", "token_accuracy", "examples"}, ...],
    "average": the mean over tasks of each task's mean accuracy over depths}.
    """
    was_training = model.training
    model.eval()
    jobs = [(task, depth) for task in tasks for depth in depths]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="ruler", unit="depth", leave=False)
    results: dict = {task: [] for task in tasks}
    try:
        for task, depth in jobs:
            batch = make_suite(task, documents, length, [depth], examples, seed, encode)
            row = answer_accuracy(model, batch, batch_size=batch_size, autocast_dtype=autocast_dtype)
            distance = sum(e.distance for e in batch) / len(batch)
            results[task].append({"depth": depth, "distance": distance, **row})
    finally:
        model.train(was_training)
    per_task = [sum(r["accuracy"] for r in rows) / len(rows) for rows in results.values() if rows]
    results["average"] = sum(per_task) / len(per_task) if per_task else float("nan")
    return results
