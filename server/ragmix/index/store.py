"""The passage store: SQLite, where row i is FAISS id i, with indexed lookups by row and by id."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ragmix.errors import BundleError, NotFoundError, shown

_NOT_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    source: str = ""


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


SCHEMA = """
CREATE TABLE passages (
    row    INTEGER PRIMARY KEY,  -- the passage's FAISS id
    id     TEXT NOT NULL UNIQUE, -- indexed: passage_ids lookups
    title  TEXT NOT NULL,
    text   TEXT NOT NULL,
    source TEXT NOT NULL,        -- the file the passage came from
    seq    INTEGER NOT NULL      -- when it was added, in order
);
"""


def write_passages(path: Path, passages: Iterable[Passage]) -> int:
    """Write the passage store (SQLite, WAL journal) with row i = FAISS id i; returns the count.

    The connection is closed before the bundle's checksums are taken, which checkpoints the WAL
    into the file, so the store is the one file the manifest lists.
    """
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        with con:
            con.executemany(
                "INSERT INTO passages (row, id, title, text, source, seq) VALUES (?, ?, ?, ?, ?, ?)",
                ((i, p.id, p.title, p.text, p.source, i) for i, p in enumerate(passages)),
            )
        return con.execute("SELECT count(*) FROM passages").fetchone()[0]
    finally:
        con.close()


class PassageStore:
    """Passages by FAISS row and by id, read from SQLite on demand: indexed queries, so memory
    does not grow with the corpus. Opened read-only and immutable (the bundle's checksums pin its
    bytes), so readers take no locks and leave no -wal or -shm files beside it."""

    def __init__(self, con: sqlite3.Connection, path: Path, name: str = "index") -> None:
        self._con = con
        self._lock = threading.Lock()  # one connection, shared by the retrieval and RPC threads
        self._path = path
        self._name = name
        self._size = self._one("SELECT count(*) FROM passages")[0]
        first = self._one("SELECT id FROM passages ORDER BY row LIMIT 1")
        self._example = first[0] if first else "title:0"
        last = self._one("SELECT max(row) FROM passages")[0]
        if self._size and last != self._size - 1:
            raise BundleError(
                f"{path}: passage rows are not 0..{self._size - 1}; rebuild the index."
            )

    @classmethod
    def load(cls, path: Path, name: str = "index") -> PassageStore:
        try:
            con = sqlite3.connect(
                f"{Path(path).absolute().as_uri()}?mode=ro&immutable=1",
                uri=True,
                check_same_thread=False,
            )
            return cls(con, Path(path), name)
        except sqlite3.DatabaseError as e:
            raise BundleError(f"{path} is not a passage store SQLite can read ({e}).") from e

    def _one(self, sql: str, args: Sequence[object] = ()) -> tuple | None:
        with self._lock:
            return self._con.execute(sql, args).fetchone()

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, row: int) -> Passage:
        found = None
        if 0 <= row < self._size:
            found = self._one("SELECT id, title, text, source FROM passages WHERE row = ?", (row,))
        if found is None:
            raise NotFoundError(
                f"passage row {row} is out of range for index {self._name} ({self._size} passages)."
            )
        return Passage(*found)

    @property
    def example_id(self) -> str:
        return self._example

    def find(self, ids: Sequence[str]) -> dict[str, int]:
        """The FAISS row of each id the store holds (an indexed query); unknown ids are absent."""
        marks = ",".join("?" * len(ids))  # "IN ()" is valid SQLite: no ids, no rows
        with self._lock:
            return dict(
                self._con.execute(f"SELECT id, row FROM passages WHERE id IN ({marks})", list(ids))
            )


def unknown_ids(unknown: Sequence[str], index: str, example: str) -> NotFoundError:
    """The error for ids an index does not hold, naming the first few."""
    listed = ", ".join(shown(i) for i in unknown[:5]) + (" …" if len(unknown) > 5 else "")
    return NotFoundError(
        f"unknown passage id(s) {listed} in index {index} "
        f"(ids look like {example!r}; Retrieve returns them)."
    )
