"""Held-out loss of a language model on whole documents, overall and by position in the context.

Training measures its runs with it (`sparsek.train`) and the evaluations report it (`sparsek.eval`): it sits below
both.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

from .data.corpus import document_windows


@torch.no_grad()
def evaluate(model: torch.nn.Module, documents: list[Tensor], context: int, *, batch_size: int = 8,
             max_tokens: int = 0, autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Cross-entropy of `model` on token documents, each cut into consecutive windows of `context` tokens.

    Every token after a document's first is predicted once, from the context since its window's start, so the
    loss at position p of a window says how well the model uses p tokens of history.

    Args:
        model: maps ids [B, T] to logits [B, T, V] and has `token_losses(tokens [B, T + 1]) -> [B, T]`
            (`TransformersLM` wraps a transformers model so).
        documents: 1-D int64 token tensors (whole documents).
        context: window length T.
        batch_size: windows per forward.
        max_tokens: evaluate at most this many predicted tokens (whole windows, documents in order); 0 = all.
        autocast_dtype: e.g. torch.bfloat16 on CUDA; None runs in the model's dtype.
        progress: show a progress bar.

    Returns:
        {"loss": nats per token, "ppl": exp(loss), "bits_per_token", "tokens": count,
         "loss_by_position": [T] mean loss at each position (NaN where no window is that long)}.
    """
    device = next(model.parameters()).device
    windows = [w for doc in documents for w in document_windows(doc, context)]
    if max_tokens:
        kept, total = [], 0
        for window in windows:
            if total >= max_tokens:
                break
            kept.append(window)
            total += len(window) - 1
        windows = kept
    if not windows:
        raise ValueError("no document has 2 or more tokens to evaluate")
    loss_sum = torch.zeros(context, dtype=torch.float64, device=device)
    count = torch.zeros(context, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    # Batches of equal-length windows only: padding would shift the hash variant's sorted chunks.
    by_length: dict[int, list[Tensor]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    batches = [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="eval", unit="batch", leave=False)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())
    for chunk in batches:
        tokens = torch.stack(chunk).to(device)                        # [b, n + 1]
        with autocast:
            losses = model.token_losses(tokens).double()              # [b, n]
        loss_sum[: losses.shape[1]] += losses.sum(0)
        count[: losses.shape[1]] += losses.shape[0]
    model.train(was_training)
    loss = (loss_sum.sum() / count.sum()).item()
    by_position = (loss_sum / count).tolist()  # 0 / 0 -> NaN where no window reaches
    return {"loss": loss, "ppl": math.exp(loss), "bits_per_token": loss / math.log(2),
            "tokens": int(count.sum().item()), "loss_by_position": by_position}


class TransformersLM(torch.nn.Module):
    """A transformers causal LM seen as one of ours: ids [B, T] -> logits [B, T, V] and `token_losses`, so that
    `evaluate` and the long-range tasks take either kind."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids, use_cache=False).logits

    #: float32 logits handled at once by token_losses (elements, 256 MB).
    LOSS_CHUNK = 2**26

    def token_losses(self, tokens: Tensor) -> Tensor:
        """tokens [B, T + 1] -> cross-entropy of predicting tokens[:, 1:] from the prefix, [B, T] float32.

        The loss is taken a slice of positions at a time: with a large vocabulary (49k for SmolLM2) a float32 copy
        of all the logits [B, T, V] and its log-softmax would each be twice the bf16 logits (GBs at long context).
        """
        logits, targets = self(tokens[:, :-1]), tokens[:, 1:]                # [B, T, V] in the model's dtype
        step = max(1, self.LOSS_CHUNK // (logits.shape[0] * logits.shape[2]))
        return torch.cat([torch.nn.functional.cross_entropy(logits[:, s : s + step].float().transpose(1, 2),
                                                            targets[:, s : s + step], reduction="none")
                          for s in range(0, logits.shape[1], step)], dim=1)
