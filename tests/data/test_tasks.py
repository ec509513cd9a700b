"""Long-range task examples: exact length, the fact where `distance` says, answers that match the facts, distractors
intact, determinism, and the training mixer's partition independence.

Oracles search the decoded text for the facts with plain string operations; they do not reuse the generator.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from sparsek.data.corpus import ByteTokenizer
from sparsek.data.tasks import TASKS, TaskMixer, distance_range, make_example, make_examples

ENCODE = ByteTokenizer().encode
FILLER = list(b"the quick brown fox jumps over the lazy dog; " * 60)   # no digits, no apostrophes


def text(tokens: torch.Tensor) -> str:
    return bytes(tokens.tolist()).decode()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("distance", [None, 50, 120, 300])
def test_example_layout(task, distance):
    length = 400
    rng = random.Random(distance)
    example = make_example(task, FILLER, length, distance, rng, ENCODE)
    assert example.tokens.shape == (length,) and example.tokens.dtype == torch.long
    s = text(example.tokens)
    answer = s[len(s) - example.answer_length:]
    assert re.fullmatch(r" \d+", answer)
    if task == "passkey":
        fact = f" The pass key is {answer[1:]}. Remember it. {answer[1:]} is the pass key."
        assert s.count(fact) == 1 and s.endswith(f" What is the pass key? The pass key is{answer}")
    else:
        name = re.search(r" What is (\w+)'s number\? \1's number is \d+$", s).group(1)
        fact = f" {name}'s number is {answer[1:]}."
        facts = re.findall(r" (\w+)'s number is (\d+)\.", s)
        assert len(facts) == 4 and len({n for n, _ in facts}) == 4                  # three intact distractors
        assert s.count(fact) == 1
    fact_end = s.index(fact) + len(fact)
    assert len(s) - example.answer_length - fact_end == example.distance
    if distance is not None:
        assert example.distance == distance


def test_examples_are_deterministic_and_vary():
    docs = [torch.tensor(FILLER)]
    a = make_examples("recall", docs, 300, 100, 6, seed=1, encode=ENCODE)
    b = make_examples("recall", docs, 300, 100, 6, seed=1, encode=ENCODE)
    c = make_examples("recall", docs, 300, 100, 6, seed=2, encode=ENCODE)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, c))
    assert len({text(x.tokens)[-4:] for x in a}) > 1                                   # different answers


def test_distance_range_is_what_fits():
    for task in TASKS:
        lo, hi = distance_range(task, 300, ENCODE)
        for distance in (lo, hi):
            for seed in range(20):
                make_example(task, FILLER, 300, distance, random.Random(seed), ENCODE)  # never raises
        with pytest.raises(ValueError, match="outside"):
            make_example(task, FILLER, 300, hi + 20, random.Random(0), ENCODE)
        with pytest.raises(ValueError, match="outside"):
            make_example(task, FILLER, 300, 5, random.Random(0), ENCODE)


def test_bad_input():
    with pytest.raises(ValueError, match="task"):
        make_example("sorting", FILLER, 300, 100, random.Random(0), ENCODE)
    with pytest.raises(ValueError, match="outside"):                     # no distance fits; none drawn
        make_example("passkey", FILLER, 30, None, random.Random(0), ENCODE)
    with pytest.raises(ValueError, match="filler"):
        make_example("passkey", FILLER[:200], 300, 100, random.Random(0), ENCODE)
    with pytest.raises(ValueError, match="no filler document"):
        make_examples("passkey", [torch.tensor(FILLER[:200])], 300, 100, 2, 0, ENCODE)
    with pytest.raises(ValueError, match="fraction"):
        TaskMixer(["passkey"], 0.0, ENCODE)
    with pytest.raises(ValueError, match="subset"):
        TaskMixer(["passkey", "sorting"], 0.5, ENCODE)
    with pytest.raises(ValueError, match="too short for recall"):
        TaskMixer(["recall"], 0.5, ENCODE)(torch.zeros(2, 65, dtype=torch.long), step=0)


def test_mixer_replaces_rows_alike_in_any_partition():
    generator = torch.Generator().manual_seed(0)
    batch = torch.stack([torch.tensor(FILLER[o : o + 257]) for o in torch.randint(0, 2000, (8,), generator=generator)])
    mixer = TaskMixer(["passkey", "recall"], 0.5, ENCODE, seed=3)
    whole = mixer(batch, step=7)
    replaced = [not torch.equal(whole[i], batch[i]) for i in range(8)]
    assert 0 < sum(replaced) < 8                                                   # some rows, not all
    for i in range(8):
        s = text(whole[i])
        assert ("pass key" in s or "number" in s) == replaced[i]
    for world in (2, 4):
        for rank in range(world):
            assert torch.equal(mixer(batch[rank::world], step=7, rank=rank, world_size=world), whole[rank::world])
    assert not torch.equal(mixer(batch, step=8), whole)                             # other steps, other rows
