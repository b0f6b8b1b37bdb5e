"""Bundles on disk: a folder with `manifest.json` and the files it lists with their sha256.

Model bundles and index bundles share this: checksums make a half-copied or edited bundle fail at
load with a message naming the file, and `atomic_dir` makes a half-written bundle impossible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ragmix.errors import BundleError

LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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


def read_manifest(folder: Path, kind: str, verify: bool = True) -> dict[str, Any]:
    """Load and check a bundle's manifest: right kind, known format, every file present and intact."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a ragmix {kind} bundle: {MANIFEST} is missing.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}.") from e
    if manifest.get("kind") != kind:
        raise BundleError(f"{folder} holds a {manifest.get('kind')!r} bundle, expected {kind!r}.")
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(
            f"{folder} has bundle format {manifest.get('format')!r}; this ragmix reads "
            f"format {FORMAT_VERSION}. Rebuild the bundle."
        )
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    for name, entry in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"{folder}: file {name} listed in {MANIFEST} is missing.")
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{folder}: checksum mismatch for {name} (size {p.stat().st_size} bytes, "
                f"manifest says {entry['bytes']}). The bundle is damaged; rebuild it."
            )
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise BundleError(
                f"{folder}: checksum mismatch for {name} (sha256 {digest[:12]}…, manifest says "
                f"{entry['sha256'][:12]}…). The bundle is damaged; rebuild it."
            )


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    The temporary folder is a sibling so the final rename stays on one filesystem (atomic).
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass overwrite to replace it.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a bundle is meant to be shared
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        LOG.info("wrote bundle %s", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
