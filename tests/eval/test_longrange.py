"""Long-range evaluation: accuracy against distance means what it says, and `sparsek eval` runs end to end.

The oracle is an induction rule written here: predict the token that followed the longest earlier match of the
current suffix, looking back at most `reach` tokens. It must answer every example whose fact lies within reach
and none beyond, which pins the distance bookkeeping and the accuracy count at once.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from sparsek.data.corpus import ByteTokenizer
from sparsek.data.tasks import TASKS, make_examples
from sparsek.eval.longrange import answer_accuracy, default_distances, evaluate_tasks

from ..conftest import tiny_transformers_model

ENCODE = ByteTokenizer().encode
DOCS = [torch.tensor(list(b"the quick brown fox jumps over the lazy dog; " * 40))]


class InductionOracle(torch.nn.Module):
    """A stand-in for a transformers causal LM (forward(ids, logits_to_keep=n).logits)."""

    def __init__(self, reach: int):
        super().__init__()
        self.reach = reach
        self.dummy = torch.nn.Parameter(torch.zeros(1))   # gives the evaluation a device

    def predict(self, seq: list[int], i: int) -> int:
        """The token after position i, from the longest suffix match starting within reach of i."""
        for size in range(min(24, i + 1), 0, -1):
            suffix = seq[i - size + 1 : i + 1]
            for j in range(i - 1, max(size - 2, i - self.reach + size - 1), -1):
                if seq[j - size + 1 : j + 1] == suffix:
                    return seq[j + 1]
        return 0

    def forward(self, ids, logits_to_keep=1, use_cache=False):
        logits = torch.zeros(ids.shape[0], logits_to_keep, 256)
        for b, row in enumerate(ids.tolist()):
            for n, i in enumerate(range(len(row) - logits_to_keep, len(row))):
                logits[b, n, self.predict(row, i)] = 1.0
        return types.SimpleNamespace(logits=logits)


@pytest.mark.parametrize("task", TASKS)
def test_accuracy_is_one_within_reach_and_zero_beyond(task):
    oracle, length = InductionOracle(reach=150), 400
    near = make_examples(task, DOCS, length, 50, 6, seed=0, encode=ENCODE)     # fact within the reach
    far = make_examples(task, DOCS, length, 200, 6, seed=0, encode=ENCODE)     # fact wholly beyond it
    assert answer_accuracy(oracle, near, batch_size=4) == {"accuracy": 1.0, "token_accuracy": 1.0, "examples": 6}
    result = answer_accuracy(oracle, far, batch_size=4)
    assert result["accuracy"] == 0.0 and result["token_accuracy"] < 0.5


def merged_digits(text: str) -> list[int]:
    """Bytes, but a doubled digit is one token (like a subword merge): keys of one length vary in token count."""
    tokens, data, i = [], text.encode(), 0
    while i < len(data):
        doubled = i + 1 < len(data) and data[i] == data[i + 1] and chr(data[i]).isdigit()
        tokens.append(200 + data[i] - ord("0") if doubled else data[i])
        i += 2 if doubled else 1
    return tokens


@pytest.mark.parametrize("task", TASKS)
def test_answers_of_different_token_counts(task):
    """Examples whose answers have different token counts are scored together, each in full."""
    oracle = InductionOracle(reach=150)
    near = make_examples(task, DOCS, 400, 60, 24, seed=0, encode=merged_digits)
    assert len({e.answer_length for e in near}) > 1
    assert answer_accuracy(oracle, near, batch_size=4) == {"accuracy": 1.0, "token_accuracy": 1.0, "examples": 24}
    far = make_examples(task, DOCS, 400, 250, 24, seed=0, encode=merged_digits)
    assert answer_accuracy(oracle, far, batch_size=4)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="no examples"):
        answer_accuracy(oracle, [])


def test_evaluate_tasks_table():
    oracle = InductionOracle(reach=150)
    result = evaluate_tasks(oracle, DOCS, ENCODE, length=400, distances=[10, 60, 250, 390], examples=3)
    for task in TASKS:
        distances = [r["distance"] for r in result[task]]
        assert 10 not in distances and 390 not in distances          # shorter than the question / no room
        accuracy = {r["distance"]: r["accuracy"] for r in result[task]}
        assert accuracy[60] == 1.0 and accuracy[250] == 0.0
    points = default_distances(2049, window=128)
    assert points[0] == 16 and {64, 144, 1024} <= set(points) and points[-1] > 1900


def test_sparsek_eval_cli_on_a_run_and_a_transformers_model(tmp_path, corpus_dir, capsys):
    pytest.importorskip("transformers")
    from sparsek.cli import main
    run = tmp_path / "run"
    main(["train", "--run-dir", str(run), "--data", str(corpus_dir), "--attention", "sparsek_window",
          "--steps", "3", "--batch-size", "2", "--context", "128", "--budget", "16", "--d-model", "32",
          "--tasks", "passkey,recall", "--eval-tokens", "128", "--no-progress", "--device", "cpu"])
    capsys.readouterr()
    # Twice and four times the training context (length extrapolation), with both tasks.
    main(["eval", str(run), "--context", "256,512", "--examples", "2", "--max-tokens", "1024", "--no-progress",
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "context 256 (trained at 128)" in printed and "passkey" in printed and "recall" in printed
    result = json.loads((run / "eval_512.json").read_text())
    assert result["window"] == 8 and len(result["perplexity"]["loss_by_position"]) == 512
    assert all(result["tasks"][task] for task in TASKS)
    for name in ("position_256.png", "tasks_256.png", "position_512.png", "tasks_512.png"):
        assert (run / name).is_file(), name

    folder = tiny_transformers_model(tmp_path)
    main(["eval", str(folder), "--context", "200", "--data", str(corpus_dir), "--examples", "2",
          "--max-tokens", "320", "--distances", "60, 100,", "--tasks", "passkey, recall", "--out-dir",
          str(tmp_path / "hf"), "--no-progress", "--device", "cpu"])              # lists as people type them
    result = json.loads((tmp_path / "hf" / "eval_200.json").read_text())
    assert result["attention"] == "original" and result["perplexity"]["tokens"] > 0
    for task in TASKS:
        assert [r["distance"] for r in result["tasks"][task]] == [60, 100]



def test_bad_evaluation_settings_are_refused_before_any_work(tmp_path):
    """A misspelt task, a non-positive context or no examples fail at once, not after the first perplexity."""
    from sparsek.eval.suite import Subject, evaluate_subject

    class Untouchable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def token_losses(self, tokens):
            raise AssertionError("the perplexity ran before the settings were checked")

    model = Untouchable()
    subject = Subject("x", model, model, ENCODE, DOCS)
    for bad, message in [(dict(tasks=("passky",)), "passky"), (dict(contexts=[0]), "contexts"),
                         (dict(contexts=[]), "contexts"), (dict(examples=0), "examples")]:
        options = dict(contexts=[64], tasks=TASKS, examples=2, progress=False) | bad
        with pytest.raises(ValueError, match=message):
            evaluate_subject(subject, out_dir=tmp_path, **options)


def test_sparsek_eval_suite_ruler(tmp_path, corpus_dir, capsys):
    pytest.importorskip("transformers")
    from sparsek.cli import main
    from sparsek.data.ruler import SUITE

    folder = tiny_transformers_model(tmp_path)
    main(["eval", str(folder), "--context", "600", "--data", str(corpus_dir), "--examples", "1", "--tasks", "none",
          "--suite", "ruler", "--depths", "0.2,0.8", "--max-tokens", "600", "--out-dir", str(tmp_path / "hf"),
          "--no-progress", "--device", "cpu"])
    result = json.loads((tmp_path / "hf" / "eval_600.json").read_text())
    assert set(result["suite"]) == {*SUITE, "average"}
    assert all([cell["depth"] for cell in result["suite"][task]] == [0.2, 0.8] for task in SUITE)
    assert "suite average" in capsys.readouterr().out
