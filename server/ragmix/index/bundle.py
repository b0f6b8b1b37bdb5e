"""A loaded index bundle: FAISS search over unit passage vectors, the passage store, and the
changes made online (added passages, masked deletions), durable in the version's live folder.

The manifest pins the encoder's fingerprint: an index searched with vectors from another encoder
returns confident nonsense, so loading refuses the mismatch instead
(docs/DESIGN.md § The contract, Bundles, Online updates).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ragmix.errors import BundleError, ConflictError, NotFoundError, ValidationError
from ragmix.index import live
from ragmix.index.changes import ChangeLog, LogIdentity
from ragmix.index.gpu import GpuFlat
from ragmix.index.store import Passage, PassageStore, slug, unknown_ids
from ragmix.index.tombstones import Tombstones
from ragmix.index.types import SearchKnobs, check_knobs, index_type_of, search_parameters
from ragmix.models import bundle

LOG = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.sqlite"
OLD_PASSAGES_FILE = "passages.jsonl"  # ragmix before the SQLite store
REQUIRED = ("name", "encoder", "dimension", "passages", "files")
"""Manifest keys the loader reads."""


@dataclass(frozen=True)
class SnapshotPolicy:
    """When the writer saves its FAISS index: after `changes` changes or `seconds` after the
    first change not yet saved, whichever comes first (and on a clean stop)."""

    changes: int = 1000
    seconds: float = 60.0


@dataclass(frozen=True)
class IndexCounts:
    """What IndexStats reports."""

    passages: int  # searchable: built + added - deleted
    vectors: int  # in FAISS: built + added
    built: int
    added: int
    deleted: int
    sequence: int
    snapshot_sequence: int
    writable: bool


def check_store_format(folder: Path, manifest: dict[str, Any], root: Path) -> None:
    """Refuse a bundle whose passages are the JSONL file of ragmix before the SQLite store."""
    if OLD_PASSAGES_FILE in manifest["files"]:
        raise BundleError(
            f"{folder} keeps its passages in {OLD_PASSAGES_FILE}, the format of ragmix before "
            f"the SQLite passage store; {bundle.fix_for('index', root)}."
        )


def check_encoder(
    folder: Path, manifest: dict[str, Any], fingerprint: str, encoder_name: str | None = None
) -> None:
    built_with = manifest.get("encoder")
    if not isinstance(built_with, dict):
        built_with = {}
    if built_with.get("fingerprint") == fingerprint:
        return
    loaded = f"encoder {encoder_name} " if encoder_name else "an encoder "
    raise BundleError(
        f"index {manifest.get('name', folder)} ({folder}) was built with encoder "
        f"{built_with.get('name', '?')} (fingerprint {str(built_with.get('fingerprint'))[:12]}…) "
        f"but the server loaded {loaded}(fingerprint {fingerprint[:12]}…); rebuild with "
        f"`ragmix index build SOURCES --encoder ENCODER_DIR --out {folder}` or serve the encoder "
        "it was built with."
    )


def read_built(folder: Path, manifest: dict[str, Any], root: Path) -> tuple[Any, PassageStore]:
    """The built FAISS index (memory-mapped, read-only: a large index costs page cache rather
    than heap) and the passage store, checked against each other and the manifest."""
    try:
        index = faiss.read_index(
            str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        )
    except RuntimeError as e:  # checksums hold, so the file was written wrong
        raise BundleError(
            f"{folder}/{INDEX_FILE} is not a FAISS index FAISS can read ({e}); "
            f"{bundle.fix_for('index', root)}."
        ) from e
    kind = index_type_of(index)
    with bundle.malformed(folder, "index"):
        store = PassageStore.load(folder / PASSAGES_FILE, manifest["name"])
        consistent = (
            index.ntotal == len(store) == int(manifest["passages"])
            and index.d == int(manifest["dimension"])
            and isinstance(manifest["encoder"]["fingerprint"], str)
            and kind == manifest.get("index_type", "flat")
        )
    if not consistent:
        raise BundleError(
            f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors of {index.d} dims "
            f"({kind}), {PASSAGES_FILE} {len(store)} passages, the manifest "
            f"says {manifest['passages']} of {manifest['dimension']} "
            f"({manifest.get('index_type', 'flat')}); {bundle.fix_for('index', root)}."
        )
    return index, store


def replayed(folder: Path, built: Any, changes: ChangeLog) -> tuple[Any, int]:
    """The FAISS index with every added passage: the live snapshot (when it fits the log) or a
    copy of the built index in memory, plus the log's vectors after it. Returns (index, number
    of vectors the snapshot held)."""
    added, _, _ = changes.counts()
    n_built, last = int(built.ntotal), int(built.ntotal) + added
    index = live.read_snapshot(live.live_folder(folder))
    if index is not None and not (
        index.d == built.d
        and index_type_of(index) == index_type_of(built)
        and n_built <= index.ntotal <= last
    ):
        LOG.warning(
            "ignoring the snapshot in %s: %d vectors of %d dims (%s) do not fit the log "
            "(%d..%d vectors); replaying the change log instead",
            live.live_folder(folder), index.ntotal, index.d, index_type_of(index), n_built, last,
        )  # fmt: skip
        index = None
    if index is None:
        index = faiss.read_index(str(folder / INDEX_FILE))  # in memory: it will be added to
    held = int(index.ntotal)
    started = time.perf_counter()
    for row, vectors in changes.added_vectors(held, int(index.d)):
        assert row == index.ntotal, (row, index.ntotal)
        index.add(vectors)
    if index.ntotal != last:
        raise BundleError(
            f"{changes.path} lists {added} added passages but {index.ntotal - n_built} were "
            "replayed; move the live folder away to serve the index as built."
        )
    if last > held:
        LOG.info(
            "replayed %d added passages onto %s in %.2f s",
            last - held, "the snapshot" if held > n_built else "the built index",
            time.perf_counter() - started,
        )  # fmt: skip
    return index, held


class IndexBundle:
    """A loaded index: FAISS search over unit passage vectors plus the passage store.

    Rows 0..built-1 are the build's passages (passages.sqlite), rows after them the passages
    added online (the change log); deleted rows stay in FAISS, masked. Searches, lookups and
    changes all run on one thread (the retrieval worker): FAISS indexes are not safe to search
    while another thread adds to them.
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        index: Any,
        store: PassageStore,
        defaults: SearchKnobs | None = None,
        changes: ChangeLog | None = None,
        snapshot_policy: SnapshotPolicy | None = None,
        snapshot_held: int = 0,
        gpu: int | None = None,
    ):
        self.folder = folder
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.dimension: int = int(index.d)
        self.encoder_fingerprint: str = manifest["encoder"]["fingerprint"]
        self.index_type: str = index_type_of(index)
        self.nlist: int = (
            int(faiss.extract_index_ivf(index).nlist) if self.index_type == "ivfpq" else 0
        )
        self.defaults = defaults or SearchKnobs()
        check_knobs(self.index_type, self.defaults, 1, self.nlist)  # the server's flags
        self.built = len(store)
        self._index = index
        self._gpu = GpuFlat.of(index, self.index_type, gpu)  # a search copy, or None
        self._store = store
        self._changes = changes
        self._gone = Tombstones(changes.deleted_rows() if changes else None)
        self.policy = snapshot_policy or SnapshotPolicy()
        self._snapshot_seq = int(changes.meta("snapshot_sequence", "0")) if changes else 0
        self._unsaved = 0  # changes since the last snapshot (or since start, if replayed)
        self._unsaved_since = 0.0
        self._lock_fd: int | None = None
        if changes is not None and snapshot_held < int(index.ntotal):
            self._unsaved, self._unsaved_since = int(index.ntotal) - snapshot_held, time.monotonic()

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        encoder_fingerprint: str | None = None,
        encoder_name: str | None = None,
        defaults: SearchKnobs | None = None,
        writable: bool = False,
        snapshot_policy: SnapshotPolicy | None = None,
        gpu: int | None = None,
    ) -> IndexBundle:
        """Verify and open the bundle with its online changes. `defaults`: the server's search
        knobs. `writable`: this server accepts changes (it holds the live folder's lock). `gpu`:
        the CUDA device to search a flat index on, where FAISS has GPUs (gpu.py)."""
        root = Path(folder)
        folder, manifest = bundle.open_bundle(root, "index", verify=False, required=REQUIRED)
        if encoder_fingerprint is not None:
            check_encoder(root, manifest, encoder_fingerprint, encoder_name)
        check_store_format(folder, manifest, root)
        bundle.verify_files(folder, manifest, "index")
        index, store = read_built(folder, manifest, root)
        lock_fd = None
        if writable:
            lock_fd = live.hold_writer_lock(live.live_folder(folder))
            live.remove_partial_snapshot(live.live_folder(folder))
        try:
            identity = LogIdentity(len(store), int(index.d), manifest["encoder"]["fingerprint"])
            changes = ChangeLog.open(live.live_folder(folder), identity, writable=writable)
            held = int(index.ntotal)
            if changes is not None:
                index, held = replayed(folder, index, changes)
            loaded = cls(
                folder, manifest, index, store, defaults, changes, snapshot_policy, held, gpu
            )
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        loaded._lock_fd = lock_fd
        LOG.info(
            "loaded %s index %s: %d passages (%d built, %d added, %d deleted) from %s%s",
            loaded.index_type, loaded.name, loaded.passages, loaded.built,
            loaded.size - loaded.built, len(loaded._gone), folder,
            ", accepting changes" if writable else "",
        )  # fmt: skip
        return loaded

    # ------------------------------------------------------------------------- reads

    @property
    def size(self) -> int:
        """Vectors in FAISS (rows 0..size-1), deleted ones included."""
        return int(self._index.ntotal)

    @property
    def passages(self) -> int:
        """Passages a search can return."""
        return self.size - len(self._gone)

    @property
    def searches_on(self) -> str:
        """Where searches run: "cpu", or "cuda:N" for a GPU copy."""
        return "cpu" if self._gpu is None else f"cuda:{self._gpu.device}"

    @property
    def writable(self) -> bool:
        return self._changes is not None and self._changes.writable

    def check(self, knobs: SearchKnobs, k: int) -> None:
        """Refuse (ValidationError) knobs this index does not have or that are out of range."""
        check_knobs(self.index_type, knobs, k, self.nlist)

    def search(
        self, queries: np.ndarray, k: int, knobs: SearchKnobs | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products for a batch of query vectors, in one FAISS call: (D, I).
        Deleted rows are never returned; rows are -1 where fewer than k passages remain."""
        if k < 1:
            raise ValidationError("k", f"k must be >= 1, got {k}.")
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # queries x dim
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValidationError(
                "queries",
                f"queries must have shape [n, {self.dimension}], got {list(queries.shape)}.",
            )
        k = min(k, self.size)
        if self._gpu is not None and self._gpu.can_search(k, len(self._gone)):
            return self._gpu.search(queries, k, self._gone.masked, len(self._gone))
        params = search_parameters(
            self.index_type, knobs or SearchKnobs(), self.defaults, k, self._gone.selector()
        )
        scores, rows = self._index.search(queries, k, params=params)  # queries x k, both
        return scores, rows.astype(np.int64, copy=False)

    def passage(self, row: int) -> Passage:
        row = int(row)
        if row < self.built:
            return self._store[row]
        found = self._changes.passage(row) if self._changes and row < self.size else None
        if found is None:
            raise NotFoundError(
                f"passage row {row} is out of range for index {self.name} ({self.size} rows)."
            )
        return found

    def find(self, ids: Sequence[str]) -> dict[str, int]:
        """The row of each id a search can return (the latest, if deleted and added again)."""
        rows = {i: [r] for i, r in self._store.find(ids).items()}
        if self._changes is not None:
            for i, added in self._changes.rows_of(ids).items():
                rows.setdefault(i, []).extend(r for r in added if r < self.size)
        found = {}
        for i, candidates in rows.items():
            alive = np.array(candidates, dtype=np.int64)
            alive = alive[~self._gone.masked(alive)]
            if alive.size:
                found[i] = int(alive.max())
        return found

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """FAISS rows of the ids, in their order; NotFoundError naming the unknown ones."""
        found = self.find(ids)
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise unknown_ids(unknown, self.name, self._store.example_id)
        return np.array([found[i] for i in ids], dtype=np.int64)  # ids

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored passage vectors d(z), to score passages a request names by id."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # rows
        bad = rows[(rows < 0) | (rows >= self.size)]
        if bad.size:
            raise NotFoundError(
                f"passage row {int(bad[0])} is out of range for index {self.name} "
                f"({self.size} rows)."
            )
        if not rows.size:
            return np.empty((0, self.dimension), dtype=np.float32)
        return self._index.reconstruct_batch(rows)  # rows x dim

    def counts(self) -> IndexCounts:
        added, deleted, seq = self._changes.counts() if self._changes else (0, 0, 0)
        return IndexCounts(
            self.passages, self.size, self.built, added, deleted, seq, self._snapshot_seq,
            self.writable,
        )  # fmt: skip

    # ------------------------------------------------------------------------- changes

    def _writer(self) -> ChangeLog:
        if self._changes is None or not self._changes.writable:
            raise BundleError(f"index {self.name} was loaded read-only.")
        return self._changes

    def add(self, passages: Sequence[Passage], vectors: np.ndarray) -> tuple[list[str], int]:
        """Append passages with their unit vectors: committed to the log (fsynced), then added
        to FAISS. An id a search can already return is refused (ConflictError), all or none.
        Passages without an id get slug(title)@row. Returns (ids, sequence number)."""
        log = self._writer()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # passages x dim
        if vectors.shape != (len(passages), self.dimension):
            raise ValueError(f"vectors {vectors.shape} for {len(passages)} passages")
        first = self.size
        named = [
            p if p.id else replace(p, id=f"{slug(p.title)}@{first + n}")
            for n, p in enumerate(passages)
        ]
        taken = self.find([p.id for p in named])
        if taken:
            listed = ", ".join(sorted(taken)[:5]) + (" …" if len(taken) > 5 else "")
            raise ConflictError(
                f"passage id(s) {listed} already in index {self.name}; delete them first or "
                "choose other ids (nothing was added)."
            )
        seq = log.add(first, named, vectors)
        self._index.add(vectors)
        if self._gpu is not None:
            self._gpu.add(vectors)
        self._changed(len(named))
        return [p.id for p in named], seq

    def delete(self, ids: Sequence[str]) -> tuple[list[str], list[str], int]:
        """Mask the passages with these ids from every later search, after the log records it.
        Returns (deleted ids, ids not found, sequence number)."""
        log = self._writer()
        found = self.find(ids)
        deleted = [i for i in dict.fromkeys(ids) if i in found]
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        seq = log.counts()[2]
        if deleted:
            rows = [found[i] for i in deleted]
            seq = log.delete(rows, deleted)
            self._gone.mark(np.array(rows, dtype=np.int64))
            self._changed(len(deleted))
        return deleted, missing, seq

    def _changed(self, n: int) -> None:
        if not self._unsaved:
            self._unsaved_since = time.monotonic()
        self._unsaved += n

    def snapshot_in(self) -> float | None:
        """Seconds until a snapshot is due (0: now); None when nothing is unsaved."""
        if not self._unsaved or not self.writable:
            return None
        if self._unsaved >= self.policy.changes:
            return 0.0
        return max(0.0, self._unsaved_since + self.policy.seconds - time.monotonic())

    def snapshot(self) -> None:
        """Save the FAISS index to the live folder (temp + rename): later starts replay only the
        passages added after it. Deletions need no saving: they are masked from the log."""
        log = self._writer()
        if not self._unsaved:
            return
        started = time.perf_counter()
        seq = log.counts()[2]
        size = live.write_snapshot(self._index, live.live_folder(self.folder))
        log.set_meta("snapshot_sequence", str(seq))
        self._snapshot_seq, self._unsaved = seq, 0
        LOG.info(
            "snapshot of index %s at change %d: %d vectors, %.1f MB in %.2f s",
            self.name, seq, self.size, size / 1e6, time.perf_counter() - started,
        )  # fmt: skip

    def close(self) -> None:
        """Save what is unsaved, close the log and let go of the writer's lock."""
        try:
            if self.writable:
                self.snapshot()
        finally:
            if self._changes is not None:
                self._changes.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __repr__(self) -> str:
        return f"IndexBundle({self.name!r}, size={self.size}, folder={str(self.folder)!r})"
