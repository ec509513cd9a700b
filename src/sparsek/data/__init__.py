"""Data: real text that loads offline (`text`) and whole-document corpora for byte-level models (`corpus`)."""

from .corpus import ByteTokenizer, Document, DocumentSampler, document_windows, load_documents, split_documents
from .text import heldout_tokens, load_text, shakespeare_works, strip_gutenberg

__all__ = [
    "ByteTokenizer",
    "Document",
    "DocumentSampler",
    "document_windows",
    "heldout_tokens",
    "load_documents",
    "load_text",
    "shakespeare_works",
    "split_documents",
    "strip_gutenberg",
]
