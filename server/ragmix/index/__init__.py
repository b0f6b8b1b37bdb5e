"""Passage store + FAISS index bundles: read sources, chunk, build, load, search."""

from ragmix.index.build import build_index, ensure_default_index
from ragmix.index.bundle import IndexBundle, SnapshotPolicy
from ragmix.index.sources import Document, default_corpus, read_sources
from ragmix.index.store import Passage

__all__ = [
    "Document",
    "IndexBundle",
    "Passage",
    "SnapshotPolicy",
    "build_index",
    "default_corpus",
    "ensure_default_index",
    "read_sources",
]
