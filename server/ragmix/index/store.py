"""The passage store: passages.jsonl, where row i is FAISS id i, held in memory with an id → row map."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ragmix.errors import BundleError, NotFoundError, shown

_NOT_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def slug(title: str) -> str:
    """Readable id stem: 'The yield statement' → 'the-yield-statement'."""
    return _NOT_SLUG.sub("-", title.lower()).strip("-")[:60] or "passage"


class PassageIds:
    """Hands out unique, stable ids: f"{slug(title)}:{chunk_no}", or the id a JSONL row gives."""

    def __init__(self) -> None:
        self._stems: set[str] = set()

    def for_document(self, title: str, doc_id: str | None, n_chunks: int) -> list[str]:
        if doc_id is not None:
            # A pre-chunked corpus (one passage per row) keeps its ids verbatim.
            return [doc_id] if n_chunks == 1 else [f"{doc_id}:{i}" for i in range(n_chunks)]
        stem, n = slug(title), 1
        while stem in self._stems:
            n += 1
            stem = f"{slug(title)}-{n}"
        self._stems.add(stem)
        return [f"{stem}:{i}" for i in range(n_chunks)]


def write_passages(path: Path, passages: Iterable[Passage]) -> int:
    """Write passages.jsonl; returns the row count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
            n += 1
    return n


def _read_rows(path: Path) -> Iterator[Passage]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                yield Passage(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise BundleError(f"{path}:{lineno} is not a passage row: {e}.") from e


class PassageStore:
    """Passages by FAISS row and by id."""

    def __init__(self, passages: list[Passage], name: str = "index") -> None:
        self._passages = passages
        self._name = name
        self._rows = {p.id: i for i, p in enumerate(passages)}
        if len(self._rows) != len(passages):
            raise BundleError(f"index {name} has duplicate passage ids; rebuild it.")

    @classmethod
    def load(cls, path: Path, name: str = "index") -> PassageStore:
        return cls(list(_read_rows(path)), name)

    def __len__(self) -> int:
        return len(self._passages)

    def __getitem__(self, row: int) -> Passage:
        if not 0 <= row < len(self._passages):
            raise NotFoundError(
                f"passage row {row} is out of range for index {self._name} "
                f"({len(self._passages)} passages)."
            )
        return self._passages[row]

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        unknown = [i for i in ids if i not in self._rows]
        if unknown:
            example = self._passages[0].id if self._passages else "title:0"
            listed = ", ".join(shown(i) for i in unknown[:5]) + (" …" if len(unknown) > 5 else "")
            raise NotFoundError(
                f"unknown passage id(s) {listed} in index {self._name} "
                f"(ids look like {example!r}; Retrieve returns them)."
            )
        return np.array([self._rows[i] for i in ids], dtype=np.int64)  # ids
