"""RULER-style suite: exact length, answers that follow from the text, facts at the reported depth and distance,
determinism, refusals, and the suite's scores for an oracle and a constant model.

The oracle `solve` reads the decoded prompt alone (regexes, counting, following assignments) and never the
generator's bookkeeping; byte-level and word-level tokenizers (the latter a stand-in for subword ones) both run.
"""

from __future__ import annotations

import random
import re
import types
from collections import Counter

import pytest
import torch

from sparsek.data.ruler import SUITE, make_suite, make_suite_example
from sparsek.data.tasks import make_example
from sparsek.eval.ruler import evaluate_suite


class ByteCodec:
    encode = staticmethod(lambda s: list(s.encode()))

    def piece(self, token: int) -> str:
        return bytes([token]).decode()


class WordCodec:
    """Words with their leading space, and single punctuation marks: a growing vocabulary, lossless."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        words = re.findall(r" ?\w+| ?[^\w ]| ", text)
        assert "".join(words) == text
        for w in words:
            if w not in self.vocab:
                self.vocab[w] = len(self.pieces)
                self.pieces.append(w)
        return [self.vocab[w] for w in words]

    def piece(self, token: int) -> str:
        return self.pieces[token]


def pseudo_text(seed: int, words: int) -> str:
    """Filler like tests/conftest.py's corpus: pseudo-words of the letters a-j (no digits, capitals or colons)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    return " ".join(rng.choice(vocab) for _ in range(words))


TEXTS = [pseudo_text(seed, 700) for seed in range(3)]
CODECS = {"bytes": ByteCodec(), "words": WordCodec()}
DOCS = {name: [torch.tensor(codec.encode(t)) for t in TEXTS] for name, codec in CODECS.items()}
LENGTHS = {"bytes": (420, 1500), "words": (200,)}
ENCODE = CODECS["bytes"].encode

MAGIC = r" The special magic number for (\w+) is (\d+)\."


def solve(task: str, prompt: str) -> tuple[str, list[tuple[int, int]], int]:
    """From the prompt's text: (the right answer, the needed facts' character spans in order, the question's start)."""
    if task == "passkey":
        q = re.search(r" What is the pass key\? The pass key is$", prompt)
        facts = list(re.finditer(r" The pass key is (\d+)\. Remember it\. \1 is the pass key\.", prompt))
        assert len(facts) == 1
        return f" {facts[0][1]}", [facts[0].span()], q.start()
    if task in ("recall", "multikey", "multivalue"):
        fact, question = {
            "recall": (r" (\w+)'s number is (\d+)\.", r" What is (\w+)'s number\? \1's number is$"),
            "multikey": (MAGIC, r" What is the special magic number for (\w+)\? The special magic number for \1 is$"),
            "multivalue": (MAGIC, r" What are all the special magic numbers for (\w+)\? The special magic numbers "
                                  r"for \1 are$"),
        }[task]
        q = re.search(question, prompt)
        facts = list(re.finditer(fact, prompt[: q.start()]))
        asked = [m for m in facts if m[1] == q[1]]
        assert len(asked) == (3 if task == "multivalue" else 1)
        assert len(facts) > len(asked)                                         # distractors, intact
        return " " + ", ".join(m[2] for m in asked), [m.span() for m in asked], q.start()
    if task == "vartrack":
        q = re.search(r" Which variables are assigned the value (\d+)\? They are$", prompt)
        value: dict[str, str] = {}
        statements = list(re.finditer(r" VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))\.", prompt[: q.start()]))
        for m in statements:                                                    # in the order they are read
            value[m[1]] = m[3] or value[m[2]]
        asked = [m for m in statements if value[m[1]] == q[1]]
        assert len(asked) == 4 and len(set(value.values())) == 2              # a distractor chain, another value
        return " " + ", ".join(m[1] for m in asked), [m.span() for m in asked], q.start()
    assert task == "cwe"
    q = re.search(r" Which (\d+) words appear most often in the list\? They are$", prompt)
    listing = re.search(r" Here is a numbered list of words:((?: \d+\. [a-z]+)+)\.", prompt)
    items = re.findall(r" (\d+)\. ([a-z]+)", listing[1])
    assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
    ranked = Counter(w for _, w in items).most_common()
    k = int(q[1])
    counts = [c for _, c in ranked[: k + 1]]
    assert len(set(counts)) == k + 1                                            # the order is well defined
    return " " + ", ".join(w for w, _ in ranked[:k]), [listing.span()], q.start()


def decode(tokens: torch.Tensor, codec) -> tuple[str, list[int]]:
    """The text and where each token starts in it (plus its end)."""
    pieces = [codec.piece(t) for t in tokens.tolist()]
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    return "".join(pieces), starts


@pytest.mark.parametrize("task", SUITE)
@pytest.mark.parametrize("codec_name", CODECS)
def test_answers_depth_and_distance_follow_from_the_text(task, codec_name):
    codec = CODECS[codec_name]
    depths = [0.0, 0.37, 1.0]
    for length in LENGTHS[codec_name]:
        examples = make_suite(task, DOCS[codec_name], length, depths, 3, seed=7, encode=codec.encode)
        assert len(examples) == 3 * len(depths)
        for i, ex in enumerate(examples):
            depth = depths[i // 3]
            assert ex.tokens.shape == (length,) and ex.tokens.dtype == torch.long and ex.task == task
            text, starts = decode(ex.tokens, codec)
            cut = starts[length - ex.answer_length]
            expected, spans, question = solve(task, text[:cut])
            assert text[cut:] == expected == ex.answer
            token = starts.index                                             # a fact's edges are token edges
            assert length - ex.answer_length - token(spans[0][1]) == ex.distance
            room = token(question) - sum(token(e) - token(s) for s, e in spans)  # latest start that fits
            assert ex.depth == pytest.approx(token(spans[0][0]) / room)
            assert abs(ex.depth - depth) <= 0.5 / room + 1e-9


@pytest.mark.parametrize("task", SUITE)
def test_deterministic_per_depth_and_seed(task):
    def suite(depths, seed):
        return [e.tokens for e in make_suite(task, DOCS["bytes"], 600, depths, 3, seed, ENCODE)]

    a, b, c = suite([0.2, 0.8], 1), suite([0.2, 0.8], 1), suite([0.2, 0.8], 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert all(torch.equal(x, y) for x, y in zip(suite([0.8], 1), a[3:]))     # depths don't shift each other


@pytest.mark.parametrize("task", ["passkey", "recall"])
def test_passkey_and_recall_are_the_tasks_module_examples(task):
    filler = DOCS["bytes"][0].tolist()
    rng = random.Random(3)
    state = rng.getstate()
    ex = make_suite_example(task, filler, 700, 0.4, rng, ENCODE)
    rng.setstate(state)
    assert torch.equal(ex.tokens, make_example(task, filler, 700, ex.distance, rng, ENCODE).tokens)


def test_cwe_list_shrinks_with_the_length():
    def items(length):
        ex = make_suite_example("cwe", DOCS["bytes"][0].tolist(), length, 0.5, random.Random(0), ENCODE)
        return len(re.findall(r" \d+\. [a-z]+", bytes(ex.tokens.tolist()).decode()))

    assert items(400) < items(1500) == 27


def test_bad_inputs_are_refused():
    filler = DOCS["bytes"][0].tolist()
    with pytest.raises(ValueError, match="task must be one of"):
        make_suite_example("needle", filler, 500, 0.5, random.Random(0), ENCODE)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match="depth must lie in"):
            make_suite("multikey", DOCS["bytes"], 500, [depth], 1, 0, ENCODE)
    for task in SUITE:
        with pytest.raises(ValueError, match="too short"):
            make_suite_example(task, filler, 60, 0.5, random.Random(0), ENCODE)
    with pytest.raises(ValueError, match="filler"):
        make_suite_example("vartrack", filler[:100], 500, 0.5, random.Random(0), ENCODE)
    with pytest.raises(ValueError, match="no filler document"):
        make_suite("cwe", DOCS["bytes"], 10**6, [0.5], 1, 0, ENCODE)


class Lookup(torch.nn.Module):
    """A stand-in for a transformers causal LM that knows the examples: it predicts each one's true next tokens
    (one-hot logits), or byte 0 everywhere when `constant`."""

    def __init__(self, examples, constant: bool = False):
        super().__init__()
        self.table = {tuple(e.tokens[:-1].tolist()): e.tokens for e in examples}
        self.constant = constant
        self.dummy = torch.nn.Parameter(torch.zeros(1))   # gives the evaluation a device

    def forward(self, ids, logits_to_keep=1, use_cache=False):
        n = logits_to_keep
        if self.constant:
            targets = torch.zeros(ids.shape[0], n, dtype=torch.long)
        else:
            targets = torch.stack([self.table[tuple(row.tolist())][-n:] for row in ids])
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(targets, 256).float())


def test_evaluate_suite_scores_an_oracle_one_and_a_constant_zero():
    depths, length = (0.25, 0.75), 500
    known = [e for task in SUITE for e in make_suite(task, DOCS["bytes"], length, depths, 3, 0, ENCODE)]
    oracle = Lookup(known)
    results = evaluate_suite(oracle, DOCS["bytes"], ENCODE, length=length, depths=depths, examples=3, batch_size=2)
    assert set(results) == {*SUITE, "average"} and results["average"] == 1.0 and oracle.training
    for task in SUITE:
        distances = [e.distance for e in known if e.task == task]
        assert [r["depth"] for r in results[task]] == list(depths)
        for row, part in zip(results[task], (distances[:3], distances[3:])):
            assert row["accuracy"] == row["token_accuracy"] == 1.0 and row["examples"] == 3
            assert row["distance"] == pytest.approx(sum(part) / 3)
    zero = evaluate_suite(Lookup(known, constant=True), DOCS["bytes"], ENCODE, length=length, tasks=("cwe", "vartrack"),
                          depths=depths, examples=3)
    assert set(zero) == {"cwe", "vartrack", "average"} and zero["average"] == 0.0
    assert all(r["accuracy"] == r["token_accuracy"] == 0.0 for task in ("cwe", "vartrack") for r in zero[task])


def test_lookup_rows_ask_about_their_facts_and_use_no_suite_template():
    """Distillation rows: every question's answer (the teacher-forced ones and the row's last) is the value its
    fact gave, read back from the text; the text matches none of the suite's fact or question patterns."""
    from sparsek.data.ruler import LOOKUP_ASKED, LOOKUP_FACTS, make_lookup_row

    codec = CODECS["bytes"]
    filler = DOCS["bytes"][0].tolist()
    row = make_lookup_row(filler, 1200, random.Random(5), ENCODE)
    assert row.shape == (1200,) and torch.equal(row, make_lookup_row(filler, 1200, random.Random(5), ENCODE))
    text, _ = decode(row, codec)
    facts = {}
    for pattern in (r" Note: the key to the (\w+) is in drawer (\d+)\.", r" Record: (\w+) paid (\d+) coins on Monday\.",
                    r" Memo: the (\w+) code is (\d+)\."):
        facts.update(re.findall(pattern, text))
    assert len(facts) == LOOKUP_FACTS
    questions = re.findall(r" (?:Which drawer holds the key to the (\w+)\? Drawer|How many coins did (\w+) pay on "
                           r"Monday\? \2 paid|What is the (\w+) code\? The \3 code is) (\d+)(?=\.|$)", text)
    assert len(questions) == LOOKUP_ASKED
    assert all(facts["".join(q[:3])] == q[3] for q in questions)
    assert not re.search(r"pass key|special magic|'s number is|VAR |numbered list", text)
    with pytest.raises(ValueError, match="filler has"):
        make_lookup_row(filler[:100], 1200, random.Random(5), ENCODE)
