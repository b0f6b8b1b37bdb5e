"""The change log: passages added and deleted on a running server, durable before they are seen.

One SQLite database (WAL journal, synchronous=FULL) beside the built bundle's files. A commit
fsyncs the log, so an acknowledged change survives a crash; the FAISS index is rebuilt from it on
start (the last snapshot plus the vectors added after it). Added passages keep their vectors here:
a restart replays them without the encoder, bit for bit. Rows are never reused: a deleted
passage keeps its row and is masked (index/tombstones.py), so FAISS ids stay the store's rows.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragmix.errors import BundleError
from ragmix.index.store import Passage

CHANGES_FILE = "changes.sqlite"
REPLAY_BATCH = 4096
"""Added vectors read back per query on replay: bounded memory, few round trips."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS added (
    row    INTEGER PRIMARY KEY,  -- the passage's FAISS id: built passages + order of addition
    id     TEXT NOT NULL,        -- unique among passages not deleted (checked on add)
    title  TEXT NOT NULL,
    text   TEXT NOT NULL,
    source TEXT NOT NULL,
    seq    INTEGER NOT NULL,     -- the change that added it
    vector BLOB NOT NULL         -- float32 x dimension, as the encoder returned it
);
CREATE INDEX IF NOT EXISTS added_id ON added (id);
CREATE TABLE IF NOT EXISTS deleted (
    row INTEGER PRIMARY KEY,
    id  TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class LogIdentity:
    """What the log was written against; a log is only replayed onto the same built index."""

    built: int  # passages in the built bundle
    dimension: int
    encoder: str  # fingerprint


class ChangeLog:
    """Reads and appends the change log. Writes come from one thread (the retrieval worker);
    the lock lets RPC threads read counts meanwhile."""

    def __init__(self, con: sqlite3.Connection, path: Path, writable: bool) -> None:
        self._con = con
        self._lock = threading.Lock()
        self.path = path
        self.writable = writable

    @classmethod
    def open(cls, folder: Path, identity: LogIdentity, *, writable: bool) -> ChangeLog | None:
        """The log in `folder` (created when writable); None when read-only and there is none."""
        path = Path(folder) / CHANGES_FILE
        if not writable and not path.exists():
            return None
        try:
            if writable:
                path.parent.mkdir(parents=True, exist_ok=True)
                con = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the reply
                con.executescript(SCHEMA)
            else:
                uri = f"{path.absolute().as_uri()}?mode=ro"
                con = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            log = cls(con, path, writable)
            log._check_identity(identity)
        except sqlite3.DatabaseError as e:
            raise BundleError(
                f"{path} is not a change log SQLite can read ({e}); move it away to serve the "
                "index as built (its online changes are then lost)."
            ) from e
        return log

    def _check_identity(self, identity: LogIdentity) -> None:
        want = {k: str(v) for k, v in vars(identity).items()}
        have = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        if not have and self.writable:
            with self._transaction():
                self._con.executemany("INSERT INTO meta VALUES (?, ?)", want.items())
            return
        wrong = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if wrong:
            said = ", ".join(f"{k} {a} (index: {b})" for k, (a, b) in wrong.items())
            raise BundleError(
                f"{self.path} was written for another build of this index ({said}); move it "
                "away to serve the index as built."
            )

    # ------------------------------------------------------------------------------ reads

    def _all(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, args).fetchall()

    def counts(self) -> tuple[int, int, int]:
        """(passages added, passages deleted, last sequence number)."""
        ((added, deleted, seq),) = self._all(
            "SELECT (SELECT count(*) FROM added), (SELECT count(*) FROM deleted), "
            "max(coalesce((SELECT max(seq) FROM added), 0), "
            "coalesce((SELECT max(seq) FROM deleted), 0))"
        )
        return added, deleted, seq

    def passage(self, row: int) -> Passage | None:
        found = self._all("SELECT id, title, text, source FROM added WHERE row = ?", (row,))
        return Passage(*found[0]) if found else None

    def rows_of(self, ids: Sequence[str]) -> dict[str, list[int]]:
        """Every row each id was added at (a deleted id may have been added again)."""
        marks = ",".join("?" * len(ids))
        rows: dict[str, list[int]] = {}
        for pid, row in self._all(
            f"SELECT id, row FROM added WHERE id IN ({marks}) ORDER BY row", list(ids)
        ):
            rows.setdefault(pid, []).append(row)
        return rows

    def deleted_rows(self) -> np.ndarray:
        return np.array([r for (r,) in self._all("SELECT row FROM deleted")], dtype=np.int64)

    def added_vectors(self, first_row: int, dimension: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, vectors) of the passages added at `first_row` and after, in row order."""
        row = first_row
        while True:
            batch = self._all(
                "SELECT row, vector FROM added WHERE row >= ? ORDER BY row LIMIT ?",
                (row, REPLAY_BATCH),
            )
            if not batch:
                return
            if [r for r, _ in batch] != list(range(row, row + len(batch))):
                raise BundleError(f"{self.path}: added rows are not contiguous from row {row}.")
            vectors = np.frombuffer(b"".join(v for _, v in batch), dtype=np.float32)
            yield row, vectors.reshape(len(batch), dimension)
            row += len(batch)

    def meta(self, key: str, default: str = "") -> str:
        found = self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return found[0][0] if found else default

    # ------------------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT under the lock; ROLLBACK when the body raises."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def add(self, first_row: int, passages: Sequence[Passage], vectors: np.ndarray) -> int:
        """Append passages at rows first_row.. with their vectors in one fsynced commit;
        returns the new sequence number."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # passages x dim
        with self._transaction():
            seq = self._last_seq()
            self._con.executemany(
                "INSERT INTO added (row, id, title, text, source, seq, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (first_row + i, p.id, p.title, p.text, p.source, seq + 1 + i, v.tobytes())
                    for i, (p, v) in enumerate(zip(passages, vectors, strict=True))
                ),
            )
        return seq + len(passages)

    def delete(self, rows: Sequence[int], ids: Sequence[str]) -> int:
        """Record the deletion of rows (with their ids) in one fsynced commit; the new sequence."""
        with self._transaction():
            seq = self._last_seq()
            self._con.executemany(
                "INSERT INTO deleted (row, id, seq) VALUES (?, ?, ?)",
                ((r, i, seq + 1 + n) for n, (r, i) in enumerate(zip(rows, ids, strict=True))),
            )
        return seq + len(rows)

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction():
            self._con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _last_seq(self) -> int:
        (seq,) = self._con.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM added), 0), "
            "coalesce((SELECT max(seq) FROM deleted), 0))"
        ).fetchone()
        return seq

    def close(self) -> None:
        with self._lock:
            self._con.close()
