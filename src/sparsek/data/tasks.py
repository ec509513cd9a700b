"""Synthetic long-range tasks, generated locally: passkey retrieval and associative recall inside real text.

Each example is a sequence of exactly `length` token ids whose last tokens are the answer. The facts to retrieve
sit inside filler text (real documents, so the model reads what it was trained on), and `distance` says how many
tokens lie between the end of the fact that is asked about and the first answer token: the question itself
included. A model answers when every answer token is its argmax prediction.

  passkey  " The pass key is 71432. Remember it. 71432 is the pass key." ... " What is the pass key? The pass key
           is" -> " 71432"
  recall   several facts " Ada's number is 381." scattered before and after the one asked about ... " What is
           Ada's number? Ada's number is" -> " 381"

Tokenizers are plain `encode(text) -> list[int]` callables, so the same examples work for the byte-level models
trained here and for any transformers tokenizer (pieces are encoded separately and concatenated).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TASKS = ("passkey", "recall")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jude", "Kai", "Lena", "Milo", "Nora",
         "Otto", "Pia", "Quin", "Rosa", "Sam", "Tess", "Uma", "Vic", "Wren", "Yara", "Zane")
RECALL_FACTS = 4  # facts per recall example: the one asked about and three distractors

Encode = Callable[[str], list[int]]


@dataclass
class TaskExample:
    """tokens [length]; the answer is tokens[-answer_length:]; distance as defined in the module docstring."""

    tokens: Tensor
    answer_length: int
    distance: int


def _pieces(task: str, rng: random.Random, encode: Encode) -> tuple[list[list[int]], list[int], list[int]]:
    """(facts, question, answer) token ids; facts[0] is the fact asked about."""
    if task == "passkey":
        key = str(rng.randrange(10_000, 100_000))
        facts = [f" The pass key is {key}. Remember it. {key} is the pass key."]
        question, answer = " What is the pass key? The pass key is", f" {key}"
    elif task == "recall":
        names = rng.sample(NAMES, RECALL_FACTS)
        values = [str(rng.randrange(100, 1000)) for _ in names]
        facts = [f" {name}'s number is {value}." for name, value in zip(names, values)]
        question, answer = f" What is {names[0]}'s number? {names[0]}'s number is", f" {values[0]}"
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return [encode(fact) for fact in facts], encode(question), encode(answer)


def distance_range(task: str, length: int, encode: Encode) -> tuple[int, int]:
    """(shortest, longest) distance that every example of `length` tokens can have: the question must fit after
    the fact, and the fact before it. Measured over many draws, since keys and names vary in tokens."""
    drawn = [_pieces(task, random.Random(i), encode) for i in range(64)]
    longest_fact = max(len(f[0]) for f, _, _ in drawn)
    shortest = max(len(q) for _, q, _ in drawn)
    return shortest, length - max(len(a) for _, _, a in drawn) - longest_fact


def make_example(task: str, filler: Sequence[int], length: int, distance: int | None, rng: random.Random,
                 encode: Encode) -> TaskExample:
    """One example of `length` tokens; the filler is read consecutively from `filler` around the facts.

    Args:
        task: "passkey" or "recall".
        filler: token ids of real text, at least `length` of them.
        length: tokens in the example, answer included.
        distance: tokens from the end of the asked fact to the answer, >= the question's length; None draws it
            log-uniformly from all that fit.
        rng: draws the key, the names, the distractors' places and the filler's offset.
        encode: text -> token ids.
    """
    facts, question, answer = _pieces(task, rng, encode)
    body = length - len(question) - len(answer)                  # tokens before the question
    low, high = len(question), length - len(answer) - len(facts[0])  # the question after the fact, the fact before
    if distance is None and low <= high:  # log-uniform: as many near as far, so retrieval is first learned close by
        distance = min(high, round(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))
    if distance is None or not low <= distance <= high:
        raise ValueError(f"distance {distance} is outside [{low}, {high}] for {task} examples of {length} tokens")
    fact_end = length - len(answer) - distance
    if len(filler) < length:
        raise ValueError(f"filler has {len(filler)} tokens; an example of {length} needs at least as many")
    slots: list[int | None] = [None] * body                     # token id, or None where filler goes
    slots[fact_end - len(facts[0]) : fact_end] = facts[0]
    for fact in facts[1:]:                                       # distractors anywhere free, before or after
        for _ in range(100):
            start = rng.randrange(0, body - len(fact) + 1)
            if all(s is None for s in slots[start : start + len(fact)]):
                slots[start : start + len(fact)] = fact
                break
    offset = rng.randrange(0, len(filler) - length + 1)
    text = iter(filler[offset:])
    tokens = [next(text) if s is None else s for s in slots] + question + answer
    return TaskExample(torch.tensor(tokens, dtype=torch.long), len(answer), distance)


def make_examples(task: str, documents: Sequence[Tensor], length: int, distance: int, count: int, seed: int,
                  encode: Encode) -> list[TaskExample]:
    """`count` examples at one distance, with filler from documents of at least `length` tokens; deterministic."""
    long_enough = [d.tolist() for d in documents if d.numel() >= length]
    if not long_enough:
        raise ValueError(f"no filler document has the {length} tokens an example needs")
    rng = random.Random(f"sparsek.tasks:{task}:{length}:{distance}:{seed}")
    return [make_example(task, rng.choice(long_enough), length, distance, rng, encode) for _ in range(count)]


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names ("passkey, recall") -> their list, spaces and empty items dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_mix(tasks: Sequence[str], fraction: float) -> None:
    """Refuse unknown tasks and a fraction of task rows outside (0, 1] (configs check before any work)."""
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the task fraction must lie in (0, 1], got {fraction}")


class TaskMixer:
    """Replaces a fraction of training rows with task examples built inside the row's own text.

    Row r of the global batch of `step` is replaced or not by a draw from (seed, step, r) alone, so resumed and
    multi-process runs mix exactly as one uninterrupted process does. Distances are log-uniform over what fits:
    with uniform ones, a model whose attention only reaches nearby tokens at first (a SparseK scorer starts from
    recency) sees almost no example it can learn retrieval from.
    """

    def __init__(self, tasks: Sequence[str], fraction: float, encode: Encode, seed: int = 0):
        check_mix(tasks, fraction)
        self.tasks, self.fraction, self.encode, self.seed = tuple(tasks), fraction, encode, seed
        self._fitting_lengths: set[int] = set()

    def check_length(self, length: int) -> None:
        """Refuse rows too short to hold every task's fact, question and answer."""
        if length in self._fitting_lengths:  # checked once per length: it encodes many draws
            return
        for task in self.tasks:
            shortest, longest = distance_range(task, length, self.encode)
            if shortest > longest:
                raise ValueError(f"rows of {length} tokens are too short for {task} examples: a context of at "
                                 f"least {length - longest + shortest} is needed")
        self._fitting_lengths.add(length)

    def __call__(self, batch: Tensor, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """batch [b, T + 1] (rows rank::world_size of the global batch) -> the same rows, some replaced."""
        out = batch.clone()
        length = batch.shape[1]
        self.check_length(length)
        for i in range(batch.shape[0]):
            rng = random.Random(f"sparsek.TaskMixer:{self.seed}:{step}:{rank + i * world_size}")
            if rng.random() >= self.fraction:
                continue
            task = rng.choice(self.tasks)
            out[i] = make_example(task, batch[i].tolist(), length, None, rng, self.encode).tokens
        return out
