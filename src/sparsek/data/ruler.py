"""RULER-style long-context tasks (Hsieh et al., 2024), generated offline and deterministically inside real text.

Each example is exactly `length` token ids ending with its answer; the facts sit inside filler read from real
held-out documents. Besides the passkey and associative recall of `sparsek.data.tasks` (reused as they are), four
tasks need more than one lookup, or an aggregate:

  passkey     " The pass key is 71432. Remember it. 71432 is the pass key." ... " What is the pass key? The pass
              key is" -> " 71432"
  multikey    " The special magic number for lamp is 4093217." among the numbers of three other words ... " What is
              the special magic number for lamp? The special magic number for lamp is" -> " 4093217"
  multivalue  " The special magic number for lamp is 4093217." three times with different numbers, scattered, and
              one number for another word ... " What are all the special magic numbers for lamp? The special magic
              numbers for lamp are" -> " 4093217, 1180346, 7752901"
  vartrack    " VAR QXT = 53716." " VAR BLM = VAR QXT." " VAR ZRW = VAR BLM." " VAR HAD = VAR ZRW." spread out, and a
              second chain from another value ... " Which variables are assigned the value 53716? They are"
              -> " QXT, BLM, ZRW, HAD"
  cwe         " Here is a numbered list of words: 1. stone 2. lamp 3. stone ..." in which three words appear 6, 5 and
              4 times and the others once ... " Which 3 words appear most often in the list? They are"
              -> " stone, lamp, river"
  recall      " Ada's number is 381." among three other names' numbers ... " What is Ada's number? Ada's number is"
              -> " 381"

Where the facts go. The context is everything before the question. `depth` in [0, 1] places the first needed fact:
0 at the start of the context, 1 as late as all needed facts still fit (the last then ends where the question
begins). The other needed facts follow it in order at random places; distractors go anywhere free (a distractor
chain in its own order). `distance` counts the tokens from the end of the first needed fact to the first answer
token, as in tasks.py, so a task that needs several facts is placed and scored by the farthest one.

Tokenizers are plain `encode(text) -> list[int]` callables; every piece (fact, question, answer) is encoded on its
own and the ids concatenated, so examples work alike for byte-level and subword tokenizers. Facts are short, since
a byte-level tokenizer spends a token per character.

Shapes: tokens [length]; the answer is tokens[-answer_length:].
"""

from __future__ import annotations

import contextlib
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .tasks import TASKS, Encode, TaskExample, make_example

SUITE = ("passkey", "multikey", "multivalue", "vartrack", "cwe", "recall")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
WORDS = ("apple", "anchor", "basket", "bridge", "candle", "castle", "cloud", "copper", "desert", "dragon", "eagle",
         "engine", "falcon", "forest", "garden", "glacier", "hammer", "harbor", "island", "jacket", "jungle",
         "kettle", "ladder", "lamp", "lemon", "marble", "meadow", "mirror", "needle", "ocean", "orchid", "palace",
         "pencil", "pepper", "planet", "quartz", "rabbit", "river", "rocket", "saddle", "silver", "stone", "tiger",
         "tunnel", "velvet", "violin", "wagon", "walnut", "willow", "window", "yacht", "zebra")
MULTIKEY_FACTS = 4       # the key asked about and three distractor keys
MULTIVALUE_VALUES = 3    # numbers of the key asked about; one more fact gives another key a number
VARTRACK_HOPS = 3        # assignments after the first: chains of four variables
CWE_COUNTS = (6, 5, 4)   # occurrences of the common words, distinct so that the answer's order is defined
CWE_RARE = (3, 12)       # fewest and most words that appear once: as many as fit in half the context


@dataclass
class SuiteExample(TaskExample):
    """A TaskExample (tokens [length], the answer its last answer_length tokens, distance), so that
    `sparsek.eval.longrange.answer_accuracy` scores it, with where its first needed fact starts (depth), its task
    and its answer as text."""

    depth: float
    task: str
    answer: str


# Each drawer returns text: (needed facts in order, distractor groups each kept in order, question, answer).
Drawn = tuple[list[str], list[list[str]], str, str]


def _numbers(rng: random.Random, digits: int, count: int) -> list[str]:
    """`count` distinct numbers of `digits` digits."""
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10**digits), count)]


def _magic(word: str, number: str) -> str:
    return f" The special magic number for {word} is {number}."


def _multikey(rng: random.Random, encode: Encode, length: int) -> Drawn:
    keys = rng.sample(WORDS, MULTIKEY_FACTS)
    numbers = _numbers(rng, 7, MULTIKEY_FACTS)
    facts = [_magic(key, number) for key, number in zip(keys, numbers)]
    question = f" What is the special magic number for {keys[0]}? The special magic number for {keys[0]} is"
    return facts[:1], [[fact] for fact in facts[1:]], question, f" {numbers[0]}"


def _multivalue(rng: random.Random, encode: Encode, length: int) -> Drawn:
    key, other = rng.sample(WORDS, 2)
    numbers = _numbers(rng, 7, MULTIVALUE_VALUES + 1)
    needed = [_magic(key, number) for number in numbers[:-1]]
    question = f" What are all the special magic numbers for {key}? The special magic numbers for {key} are"
    return needed, [[_magic(other, numbers[-1])]], question, " " + ", ".join(numbers[:-1])


def _variables(rng: random.Random, count: int) -> list[str]:
    """`count` distinct names of three capitals, none of them the keyword VAR."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=3))
        if name != "VAR" and name not in names:
            names.append(name)
    return names


def _chain(names: list[str], value: str) -> list[str]:
    """The value given to names[0], then each name given the one before it."""
    return [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _vartrack(rng: random.Random, encode: Encode, length: int) -> Drawn:
    names = _variables(rng, 2 * (VARTRACK_HOPS + 1))
    value, other = _numbers(rng, 5, 2)
    asked, distractor = names[: VARTRACK_HOPS + 1], names[VARTRACK_HOPS + 1 :]
    question = f" Which variables are assigned the value {value}? They are"
    return _chain(asked, value), [_chain(distractor, other)], question, " " + ", ".join(asked)


def _cwe(rng: random.Random, encode: Encode, length: int) -> Drawn:
    words = rng.sample(WORDS, len(CWE_COUNTS) + CWE_RARE[1])
    common, rare = words[: len(CWE_COUNTS)], words[len(CWE_COUNTS) :]
    question = f" Which {len(common)} words appear most often in the list? They are"
    answer = " " + ", ".join(common)
    budget = (length - len(encode(question)) - len(encode(answer))) // 2
    order = rng.getrandbits(64)           # the rng is drawn alike whatever size fits, so sizes don't shift draws
    for n in range(CWE_RARE[1], CWE_RARE[0] - 1, -1):  # the longest list within budget, else the shortest
        items = [word for word, count in zip(common, CWE_COUNTS) for _ in range(count)] + rare[:n]
        random.Random(order).shuffle(items)
        listing = " Here is a numbered list of words:" + "".join(f" {i}. {w}" for i, w in enumerate(items, 1)) + "."
        if len(encode(listing)) <= budget:
            break
    return [listing], [], question, answer


DRAWERS = {"multikey": _multikey, "multivalue": _multivalue, "vartrack": _vartrack, "cwe": _cwe}


# Distillation data, never evaluated: facts in templates, words and names that no SUITE task uses, several of them
# asked about at the end with their answers. Rows like these give the teacher's attention a reason to reach far
# back (the questions look at their facts), and the suite then measures whether that transfers to its own tasks.
LOOKUP_WORDS = ("attic", "barrel", "cellar", "chapel", "cottage", "garage", "kitchen", "library", "market", "office",
                "pantry", "stable", "studio", "tavern", "tower", "vault", "warehouse", "workshop")
LOOKUP_PEOPLE = ("Aurelio", "Beatrix", "Casimir", "Dagny", "Edmund", "Florin", "Greta", "Horatio", "Ingrid",
                 "Jasper", "Klara", "Leopold", "Mirela", "Oskar", "Petra", "Rosalind", "Tobias", "Wilma")
LOOKUP_FACTS = 6         # facts per row
LOOKUP_ASKED = 3         # of which the last ones are asked about, in random order
_LOOKUP_TEMPLATES = (    # (keys, fact, question with its answer's lead-in)
    (LOOKUP_WORDS, " Note: the key to the {key} is in drawer {value}.", " Which drawer holds the key to the {key}? "
     "Drawer"),
    (LOOKUP_PEOPLE, " Record: {key} paid {value} coins on Monday.", " How many coins did {key} pay on Monday? {key} "
     "paid"),
    (LOOKUP_WORDS, " Memo: the {key} code is {value}.", " What is the {key} code? The {key} code is"),
)


def _lookup(rng: random.Random) -> Drawn:
    """LOOKUP_FACTS facts, each of a random template, and questions about LOOKUP_ASKED of them with the answers of
    all but the last (teacher-forced), which is the row's answer."""
    facts, questions, answers = [], [], []
    templates = [rng.choice(_LOOKUP_TEMPLATES) for _ in range(LOOKUP_FACTS)]
    keys = {id(pool): rng.sample(pool, LOOKUP_FACTS) for pool in (LOOKUP_WORDS, LOOKUP_PEOPLE)}
    for (pool, fact, question), value in zip(templates, _numbers(rng, 4, LOOKUP_FACTS)):
        key = keys[id(pool)].pop()
        facts.append(fact.format(key=key, value=value))
        questions.append(question.format(key=key))
        answers.append(f" {value}")
    asked = rng.sample(range(LOOKUP_FACTS), LOOKUP_ASKED)
    text = "".join(questions[i] + answers[i] + "." for i in asked[:-1]) + questions[asked[-1]]
    return [facts[asked[-1]]], [[fact] for i, fact in enumerate(facts) if i != asked[-1]], text, answers[asked[-1]]


def make_lookup_row(filler: Sequence[int], length: int, rng: random.Random, encode: Encode) -> Tensor:
    """Distillation data: `length` token ids [length] of filler with LOOKUP_FACTS facts at random places and
    questions about some of them at the end, each followed by its answer. Not a SUITE task, so that distilling on
    it and evaluating on the suite are different things."""
    if len(filler) < length:
        raise ValueError(f"filler has {len(filler)} tokens; a row of {length} needs at least as many")
    return _assemble("lookup", _lookup(rng), filler, length, rng.random(), rng, encode).tokens


def _check(task: str, depth: float) -> None:
    if task not in SUITE:
        raise ValueError(f"task must be one of {SUITE}, got {task!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")


def _first_start(task: str, length: int, context: int, needed: int, depth: float) -> tuple[int, int]:
    """(start of the first needed fact, room): room is the latest start at which `needed` tokens still fit."""
    room = context - needed
    if room < 0:
        raise ValueError(f"{length} tokens are too short for {task}: its question, answer and needed facts take "
                         f"{length - room}")
    return round(depth * room), room


def _fits(slots: list[int | None], pieces: list[list[int]], starts: list[int]) -> bool:
    ends = [s + len(p) for s, p in zip(starts, pieces)]
    if any(end > nxt for end, nxt in zip(ends, starts[1:] + [len(slots)])):
        return False
    return all(t is None for s, end in zip(starts, ends) for t in slots[s:end])


def _place(slots: list[int | None], pieces: list[list[int]], rng: random.Random) -> bool:
    """Writes `pieces` into free slots, in their order, at random places; False when they cannot fit."""
    for _ in range(100):
        starts = sorted(rng.randrange(len(slots)) for _ in pieces)
        if _fits(slots, pieces, starts):
            break
    else:  # crowded: each piece at the first free place after the one before, which fits whenever any order does
        starts, at = [], 0
        for piece in pieces:
            at = next((s for s in range(at, len(slots) - len(piece) + 1)
                       if all(t is None for t in slots[s : s + len(piece)])), None)
            if at is None:
                return False
            starts.append(at)
            at += len(piece)
    for start, piece in zip(starts, pieces):
        slots[start : start + len(piece)] = piece
    return True


def _assemble(task: str, drawn: Drawn, filler: Sequence[int], length: int, depth: float, rng: random.Random,
              encode: Encode) -> SuiteExample:
    needed_text, groups_text, question_text, answer_text = drawn
    needed = [encode(text) for text in needed_text]
    groups = [[encode(text) for text in group] for group in groups_text]
    question, answer = encode(question_text), encode(answer_text)
    context = length - len(question) - len(answer)
    start, room = _first_start(task, length, context, sum(map(len, needed)), depth)
    slots: list[int | None] = [None] * context                  # token id, or None where filler goes
    slots[start : start + len(needed[0])] = needed[0]
    # The other needed facts after the first, in order, with gaps cut at random from the free tokens there: they
    # always fit, since the depth left room for them.
    rest = needed[1:]
    free = context - start - sum(map(len, needed))
    at, cut_before = start + len(needed[0]), 0
    for fact, cut in zip(rest, sorted(rng.randint(0, free) for _ in rest)):
        at += cut - cut_before
        slots[at : at + len(fact)] = fact
        at, cut_before = at + len(fact), cut
    for group in groups:
        if not _place(slots, group, rng):
            raise ValueError(f"{length} tokens leave no room for the distractors of {task}")
    gaps = [i for i, token in enumerate(slots) if token is None]
    offset = rng.randrange(len(filler) - length + 1)
    for i, token in zip(gaps, filler[offset : offset + len(gaps)]):
        slots[i] = token
    tokens = torch.tensor(slots + question + answer, dtype=torch.long)
    distance = length - len(answer) - start - len(needed[0])
    return SuiteExample(tokens, len(answer), distance, start / max(room, 1), task, answer_text)


def _from_tasks(task: str, filler: Sequence[int], length: int, depth: float, rng: random.Random,
                encode: Encode) -> SuiteExample:
    """tasks.make_example at the distance that puts its asked fact at `depth`.

    That distance needs the sizes of the pieces, which make_example draws first from rng; a trial on a copy of rng
    records them as it encodes them: the facts (the asked one first), then the question, then the answer."""
    pieces: list[tuple[str, list[int]]] = []

    def record(text: str) -> list[int]:
        pieces.append((text, encode(text)))
        return pieces[-1][1]

    trial = random.Random()
    trial.setstate(rng.getstate())
    with contextlib.suppress(ValueError):  # too short for any distance: the sizes below say so clearly
        make_example(task, filler, length, None, trial, record)
    (_, fact), (_, question), (answer_text, answer) = pieces[0], pieces[-2], pieces[-1]
    context = length - len(question) - len(answer)
    start, room = _first_start(task, length, context, len(fact), depth)
    example = make_example(task, filler, length, context + len(question) - start - len(fact), rng, encode)
    if example.tokens[start : start + len(fact)].tolist() != fact or example.tokens[-len(answer) :].tolist() != answer:
        raise RuntimeError(f"tasks.make_example no longer draws the {task} pieces before anything else")
    return SuiteExample(example.tokens, example.answer_length, example.distance, start / max(room, 1), task,
                        answer_text)


def make_suite_example(task: str, filler: Sequence[int], length: int, depth: float, rng: random.Random,
                       encode: Encode) -> SuiteExample:
    """One example of `length` tokens, its first needed fact at `depth`; filler is read consecutively around facts.

    Args:
        task: a name in SUITE.
        filler: token ids of real text, at least `length` of them.
        length: tokens in the example, answer included.
        depth: in [0, 1]; where the first needed fact starts (module docstring).
        rng: draws the facts, the places of the later needed facts and distractors, and the filler's offset.
        encode: text -> token ids.

    Raises ValueError for an unknown task, a depth outside [0, 1], short filler, or a length that cannot hold the
    task's question, answer and facts.
    """
    _check(task, depth)
    if len(filler) < length:
        raise ValueError(f"filler has {len(filler)} tokens; an example of {length} needs at least as many")
    if task in TASKS:
        return _from_tasks(task, filler, length, depth, rng, encode)
    return _assemble(task, DRAWERS[task](rng, encode, length), filler, length, depth, rng, encode)


def make_suite(task: str, documents: Sequence[Tensor], length: int, depths: Sequence[float], count: int, seed: int,
               encode: Encode) -> list[SuiteExample]:
    """`count` examples at each depth (depth-major order), filler from documents [n_i] of at least `length` tokens.

    The examples at one depth depend on (task, length, depth, seed) alone, so adding depths changes no others."""
    for depth in depths:
        _check(task, depth)
    long_enough = [d.tolist() for d in documents if d.numel() >= length]
    if not long_enough:
        raise ValueError(f"no filler document has the {length} tokens an example needs")
    examples = []
    for depth in depths:
        rng = random.Random(f"sparsek.ruler:{task}:{length}:{depth}:{seed}")
        examples += [make_suite_example(task, rng.choice(long_enough), length, depth, rng, encode)
                     for _ in range(count)]
    return examples
