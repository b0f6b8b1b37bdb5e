"""Bundles on disk: versioned folders of files listed with their sha256, behind one pointer file.

    <bundle>/CURRENT           one line: the name of the version in force, e.g. v-20261202T031500-1a2b3c
    <bundle>/v-…/manifest.json the manifest and the files it lists (sha256 and size of each)
    <bundle>/.lock             held (flock) by the one process writing a new version

Model and index bundles share this. Checksums make a half-copied or edited bundle fail at load with
a message naming the file. A new version is written under a hidden name, flushed to disk, renamed,
and only then named in CURRENT by an atomic rename: whatever instant a build is killed at, the
bundle holds either the old version or the new one, complete, and a folder with no CURRENT is
never loaded. What an interrupted build leaves behind is removed by the next one, under the lock.
A folder with manifest.json at its top (a version folder itself, or a bundle written before
versions existed) loads as it is; replacing it switches it to this layout in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ragmix.errors import BundleError

LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "CURRENT"
LOCK = ".lock"
FORMAT_VERSION = 1
VERSION = re.compile(r"v-\d{8}T\d{6}-[0-9a-f]{6}")
"""A version folder's name: UTC build time and a random tag (two builds in one second differ)."""
_PARTIAL = re.compile(rf"\.({VERSION.pattern})\.partial")
_HEX64 = re.compile(r"[0-9a-f]{64}")

_FIX = {
    "generator": "rebuild it with `ragmix models export --from-hf SOURCE --out {folder} "
    "--overwrite` (`ragmix models export-default --overwrite` for the default)",
    "encoder": "rebuild it with `ragmix models export --from-hf SOURCE --out {folder} "
    "--overwrite` (`ragmix models export-default --overwrite` for the default)",
    "index": "rebuild it with `ragmix index build SOURCES --encoder ENCODER_DIR --out {folder} "
    "--overwrite`",
}


def fix_for(kind: str, folder: Path) -> str:
    """What to run to replace a damaged bundle of this kind, for the end of an error message."""
    return _FIX.get(kind, "rebuild it").format(folder=folder)


# ----------------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} for the manifest's `files`."""
    return {
        n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
        for n in sorted(names)
    }


def fingerprint(files: dict[str, dict[str, Any]]) -> str:
    """One hash over the file hashes: names what a bundle computes, whatever folder it sits in."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}:{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)


# ----------------------------------------------------------------------------------- reading


def exists(folder: Path) -> bool:
    """Whether `folder` holds a bundle a loader would try (a pointer or a top-level manifest)."""
    folder = Path(folder)
    return (folder / POINTER).is_file() or (folder / MANIFEST).is_file()


def _current(folder: Path) -> str | None:
    """The version CURRENT names, or None without a pointer; a damaged pointer is a BundleError."""
    pointer = folder / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not VERSION.fullmatch(name):
        raise BundleError(f"{pointer} does not name a bundle version (it holds {name[:80]!r}).")
    return name


def resolve(folder: Path, kind: str) -> Path:
    """The folder whose manifest is in force: the version CURRENT names, or `folder` itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{kind} bundle {folder} does not exist (or is not a folder).")
    try:
        version = _current(folder)
    except BundleError as e:
        raise BundleError(f"{e} The bundle is damaged; {fix_for(kind, folder)}.") from None
    if version is not None:
        if not (folder / version / MANIFEST).is_file():
            raise BundleError(
                f"{folder}/{POINTER} names version {version}, which has no {MANIFEST}. The "
                f"bundle is damaged; {fix_for(kind, folder)}."
            )
        return folder / version
    if (folder / MANIFEST).is_file():
        return folder
    interrupted = any(_PARTIAL.fullmatch(p.name) for p in folder.iterdir())
    raise BundleError(
        f"{folder} is not a ragmix {kind} bundle: it has neither {POINTER} nor {MANIFEST}"
        + ("; a build into it was interrupted" if interrupted else "")
        + f". {fix_for(kind, folder).capitalize()}."
    )


def open_bundle(
    folder: Path, kind: str, *, verify: bool = True, required: Sequence[str] = ()
) -> tuple[Path, dict[str, Any]]:
    """(version folder, manifest) of the bundle at `folder`, checked: every loader starts here."""
    version = resolve(folder, kind)
    return version, read_manifest(version, kind, verify=verify, required=required)


def read_manifest(
    folder: Path, kind: str, verify: bool = True, required: Sequence[str] = ()
) -> dict[str, Any]:
    """Load and check one folder's manifest: right kind, known format, the keys a loader reads,
    and (with verify) every listed file present and intact."""
    folder = Path(folder)
    path = folder / MANIFEST
    fix = fix_for(kind, folder)
    if not path.is_file():
        raise BundleError(f"{folder} is not a ragmix {kind} bundle: {MANIFEST} is missing.")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged: {fix}.") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object; the bundle is damaged: {fix}.")
    if manifest.get("kind") != kind:
        raise BundleError(f"{folder} holds a {manifest.get('kind')!r} bundle, expected {kind!r}.")
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(
            f"{folder} has bundle format {manifest.get('format')!r}; this ragmix reads "
            f"format {FORMAT_VERSION}: {fix}."
        )
    _check_files_entry(path, manifest.get("files"), fix)
    missing = [key for key in required if key not in manifest]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(map(repr, missing))}: {fix}.")
    if verify:
        verify_files(folder, manifest, kind)
    return manifest


def _check_files_entry(path: Path, files: object, fix: str) -> None:
    """The manifest's `files` is {plain file name: {"sha256": 64 hex digits, "bytes": int >= 0}}."""
    ok = isinstance(files, dict) and all(
        isinstance(name, str)
        and name
        and Path(name).name == name
        and not name.startswith(".")
        and isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _HEX64.fullmatch(entry["sha256"])
        and type(entry.get("bytes")) is int
        and entry["bytes"] >= 0
        for name, entry in files.items()
    )
    if not ok:
        raise BundleError(f"{path}: its `files` table is malformed; the bundle is damaged: {fix}.")


def verify_files(folder: Path, manifest: dict[str, Any], kind: str = "") -> None:
    fix = fix_for(kind, folder)
    for name, entry in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise BundleError(
                f"{folder}: file {name} listed in {MANIFEST} is missing. The bundle is "
                f"incomplete; {fix}."
            )
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{folder}: checksum mismatch for {name} (size {p.stat().st_size} bytes, "
                f"manifest says {entry['bytes']}). The bundle is damaged; {fix}."
            )
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise BundleError(
                f"{folder}: checksum mismatch for {name} (sha256 {digest[:12]}…, manifest says "
                f"{entry['sha256'][:12]}…). The bundle is damaged; {fix}."
            )


@contextlib.contextmanager
def malformed(folder: Path, kind: str) -> Iterator[None]:
    """A manifest whose values have the wrong shape becomes a BundleError, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(
            f"{folder}/{MANIFEST} is malformed ({type(e).__name__}: {e}); {fix_for(kind, folder)}."
        ) from e


# ----------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def new_version(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder to write a bundle into; make it the version `out` serves only if the
    block succeeds, in one atomic step (module docstring). One writer at a time per bundle."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _writing(out, overwrite) as tmp:
            yield tmp
    except BaseException:
        if created and not exists(out):  # a failed first build leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def _writing(out: Path, overwrite: bool) -> Iterator[Path]:
    with _locked(out):
        check_target(out, overwrite)  # another writer may have finished while we waited
        remove_leftovers(out)
        version = f"v-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        tmp = out / f".{version}.partial"
        tmp.mkdir(mode=0o755)
        try:
            yield tmp
            _fsync_tree(tmp)
            os.replace(tmp, out / version)
            fsync_path(out)
            _write_pointer(out, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_leftovers(out)
        LOG.info("wrote bundle %s (version %s)", out, version)


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse before any work what new_version would refuse: a bundle there without overwrite,
    or a folder of someone else's files."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; choose another output path.")
    if exists(out) and not overwrite:
        raise BundleError(f"{out} already exists; pass overwrite to replace it.")
    if out.is_dir() and not exists(out):
        foreign = [p.name for p in out.iterdir() if not _ours(p.name)]
        if foreign:
            raise BundleError(
                f"{out} is a folder with other files in it ({', '.join(sorted(foreign)[:3])}…) "
                "and not a ragmix bundle; choose an empty or new output path."
            )


def _ours(name: str) -> bool:
    """Names only ragmix's writer creates inside a bundle folder."""
    return (
        name in (POINTER, LOCK, POINTER + ".tmp")
        or VERSION.fullmatch(name) is not None
        or _PARTIAL.fullmatch(name) is not None
    )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive flock on out/.lock; the kernel drops it when the holder dies, even by SIGKILL."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise BundleError(
                f"another process is writing a bundle into {out} (it holds {out / LOCK}); wait "
                "for it to finish, or write to another output path."
            ) from None
        yield
    finally:
        os.close(fd)


def remove_leftovers(out: Path) -> None:
    """Delete what is not the version in force: interrupted builds, replaced versions, and the
    files of a top-level bundle once CURRENT has replaced it. Call only under the lock."""
    current = _current(out)
    for p in out.iterdir():
        if p.name in (POINTER, LOCK) or p.name == current:
            continue
        if current is None and not _ours(p.name):
            continue  # a top-level bundle still in force: keep its files
        LOG.info("removing %s (left by an earlier build)", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    # What ragmix before versioned bundles left beside the target when killed mid-build.
    for p in out.parent.glob(f".{out.name}.*"):
        if p.is_dir() and (p.name.endswith(".tmp") or p.name == f".{out.name}.old"):
            LOG.info("removing %s (left by an interrupted build)", p)
            shutil.rmtree(p, ignore_errors=True)


def _write_pointer(out: Path, version: str) -> None:
    tmp = out / (POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / POINTER)
    fsync_path(out)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a finished version and the folder itself before it is named anywhere."""
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_path(p)
    fsync_path(folder)
