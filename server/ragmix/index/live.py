"""The live folder of an index version: its change log, its FAISS snapshot, its writer's lock.

    <bundle>/v-…/live/changes.sqlite   every passage added or deleted online (index/changes.py)
    <bundle>/v-…/live/index.faiss      the FAISS index as of some change: built + added rows
    <bundle>/v-…/live/.lock            held (flock) by the one server that accepts changes

Online changes belong to the version they were made on: `ragmix index build` makes a new version
from its sources, without them. The snapshot only saves replay time: the log is the truth, so a
missing or unreadable snapshot costs a longer start, never a change (deletions are not in the
snapshot at all; they are masked from the log's rows on every start).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import faiss

from ragmix.errors import BundleError
from ragmix.models.bundle import fsync_path

LOG = logging.getLogger(__name__)

LIVE_DIR = "live"
SNAPSHOT_FILE = "index.faiss"
LOCK_FILE = ".lock"


def live_folder(version: Path) -> Path:
    return Path(version) / LIVE_DIR


def hold_writer_lock(folder: Path) -> int:
    """An exclusive flock on folder/.lock for the life of the process (the kernel drops it when
    the server dies, even by SIGKILL); returns its descriptor. Two servers appending to one log
    would hand out the same rows."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise BundleError(
            f"another server accepts changes to this index (it holds {folder / LOCK_FILE}); "
            "serve it without --admin-token-file, or stop the other server."
        ) from None
    return fd


def remove_partial_snapshot(folder: Path) -> None:
    """What a writer killed mid-snapshot left (call only while holding the writer's lock)."""
    (folder / (SNAPSHOT_FILE + ".tmp")).unlink(missing_ok=True)


def write_snapshot(index: Any, folder: Path) -> int:
    """Write the FAISS index to folder/index.faiss atomically (temp, fsync, rename, fsync the
    folder); returns its size in bytes."""
    tmp = folder / (SNAPSHOT_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, folder / SNAPSHOT_FILE)
    fsync_path(folder)
    return (folder / SNAPSHOT_FILE).stat().st_size


def read_snapshot(folder: Path) -> Any | None:
    """The snapshot, read into memory (it is added to), or None when there is none or FAISS cannot
    read it (the caller replays the whole log onto the built index instead)."""
    path = folder / SNAPSHOT_FILE
    if not path.is_file():
        return None
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        LOG.warning("ignoring the snapshot %s (%s); replaying the change log instead", path, e)
        return None
