"""Index bundles: passages.sqlite + a FAISS inner-product index + manifest.json, built atomically.

The manifest pins the encoder's fingerprint: an index searched with vectors from another encoder
returns confident nonsense, so loading refuses the mismatch instead
(docs/DESIGN.md § The contract, Bundles).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ragmix import paths
from ragmix.errors import BundleError, NotFoundError, ValidationError
from ragmix.index import types
from ragmix.index.chunking import chunk_words
from ragmix.index.sources import Document, default_corpus
from ragmix.index.store import Passage, PassageIds, PassageStore, write_passages
from ragmix.index.types import IndexSpec, SearchKnobs, check_knobs, index_type_of, search_parameters
from ragmix.models import bundle

if TYPE_CHECKING:
    from ragmix.models.encoder import Encoder

LOG = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.sqlite"
OLD_PASSAGES_FILE = "passages.jsonl"  # ragmix before the SQLite store
REQUIRED = ("name", "encoder", "dimension", "passages", "files")
"""Manifest keys the loader reads."""


def chunk_documents(documents: Iterable[Document], words_per_passage: int) -> list[Passage]:
    """Every document split into passages with unique, readable ids."""
    ids = PassageIds()
    passages: list[Passage] = []
    source_of: dict[str, str] = {}
    for doc in documents:
        chunks = chunk_words(doc.text, words_per_passage)
        if not chunks:
            LOG.warning("skipping %s (%r): no text", doc.source, doc.title)
            continue
        for pid, text in zip(ids.for_document(doc.title, doc.id, len(chunks)), chunks, strict=True):
            if pid in source_of:
                raise ValidationError(
                    "sources",
                    f"passage id {pid!r} from {doc.source} is already used by {source_of[pid]}; "
                    "ids must be unique.",
                )
            source_of[pid] = doc.source
            passages.append(Passage(id=pid, title=doc.title, text=text, source=str(doc.source)))
    return passages


def build_index(
    documents: Iterable[Document],
    encoder: Encoder,
    out: Path,
    *,
    words_per_passage: int = 100,
    batch_size: int = 64,
    progress: bool = True,
    overwrite: bool = False,
    name: str | None = None,
    spec: IndexSpec | None = None,
) -> Path:
    """Chunk, embed and write an index bundle at `out`; nothing appears there unless all succeeds.

    spec: the FAISS index type and its parameters (index/types.py); default `auto`, by corpus size.
    """
    started = time.perf_counter()
    bundle.check_target(out, overwrite)  # say so before minutes of encoding, not after
    passages = chunk_documents(documents, words_per_passage)
    if not passages:
        raise ValidationError("sources", "the sources hold no text to index.")
    name = name or Path(out).name
    spec = (spec or IndexSpec()).resolved(
        len(passages), encoder.dimension
    )  # refused before encoding
    with bundle.new_version(out, overwrite=overwrite) as tmp:
        write_passages(tmp / PASSAGES_FILE, passages)
        vectors = encoder.encode(
            [p.text for p in passages], batch_size=batch_size, progress=progress
        )
        if vectors.shape != (len(passages), encoder.dimension):  # passages x dim
            raise BundleError(
                f"encoder {encoder.name} returned vectors of shape {vectors.shape}, "
                f"expected {(len(passages), encoder.dimension)}."
            )
        index, details = types.build(spec, np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(index, str(tmp / INDEX_FILE))
        files = bundle.file_entries(tmp, [INDEX_FILE, PASSAGES_FILE])
        bundle.write_manifest(
            tmp,
            {
                "format": bundle.FORMAT_VERSION,
                "kind": "index",
                "name": name,
                "encoder": {
                    "name": encoder.name,
                    "fingerprint": encoder.fingerprint,
                    "dimension": encoder.dimension,
                },
                "dimension": encoder.dimension,
                "metric": "inner_product",
                "index_type": spec.type,
                "faiss_index": details["factory"],
                "index": details,
                "passages": len(passages),
                "words_per_passage": words_per_passage,
                "files": files,
            },
        )
    LOG.info(
        "built %s index %s (%s): %d passages in %.1f s",
        spec.type,
        name,
        spec.factory(),
        len(passages),
        time.perf_counter() - started,
    )
    return Path(out)


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


class IndexBundle:
    """A loaded index: FAISS search over unit passage vectors plus the passage store."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        index: Any,
        store: PassageStore,
        defaults: SearchKnobs | None = None,
    ):
        self.folder = folder
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.size: int = int(index.ntotal)
        self.dimension: int = int(index.d)
        self.encoder_fingerprint: str = manifest["encoder"]["fingerprint"]
        self.index_type: str = index_type_of(index)
        self.nlist: int = (
            int(faiss.extract_index_ivf(index).nlist) if self.index_type == "ivfpq" else 0
        )
        self.defaults = defaults or SearchKnobs()
        check_knobs(self.index_type, self.defaults, 1, self.nlist)  # the server's flags
        self._index = index
        self._store = store

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        encoder_fingerprint: str | None = None,
        encoder_name: str | None = None,
        defaults: SearchKnobs | None = None,
    ) -> IndexBundle:
        """Verify and open the bundle; the FAISS file is memory-mapped (read-only), so a large
        index costs page cache rather than heap. `defaults`: the server's search knobs."""
        root = Path(folder)
        folder, manifest = bundle.open_bundle(root, "index", verify=False, required=REQUIRED)
        if encoder_fingerprint is not None:
            check_encoder(root, manifest, encoder_fingerprint, encoder_name)
        check_store_format(folder, manifest, root)
        bundle.verify_files(folder, manifest, "index")
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
        LOG.info(
            "loaded %s index %s: %d passages from %s",
            kind,
            manifest["name"],
            len(store),
            folder,
        )
        return cls(folder, manifest, index, store, defaults)

    def check(self, knobs: SearchKnobs, k: int) -> None:
        """Refuse (ValidationError) knobs this index does not have or that are out of range."""
        check_knobs(self.index_type, knobs, k, self.nlist)

    def search(
        self, queries: np.ndarray, k: int, knobs: SearchKnobs | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products for a batch of query vectors, in one FAISS call: (D, I)."""
        if k < 1:
            raise ValidationError("k", f"k must be >= 1, got {k}.")
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # queries x dim
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValidationError(
                "queries",
                f"queries must have shape [n, {self.dimension}], got {list(queries.shape)}.",
            )
        k = min(k, self.size)
        params = search_parameters(self.index_type, knobs or SearchKnobs(), self.defaults, k)
        scores, rows = self._index.search(queries, k, params=params)  # queries x k, both
        return scores, rows.astype(np.int64, copy=False)

    def passage(self, row: int) -> Passage:
        return self._store[int(row)]

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        return self._store.rows_of(ids)

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored passage vectors d(z), to score passages a request names by id."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # rows
        bad = rows[(rows < 0) | (rows >= self.size)]
        if bad.size:
            raise NotFoundError(
                f"passage row {int(bad[0])} is out of range for index {self.name} "
                f"({self.size} passages)."
            )
        if not rows.size:
            return np.empty((0, self.dimension), dtype=np.float32)
        return self._index.reconstruct_batch(rows)  # rows x dim

    def __repr__(self) -> str:
        return f"IndexBundle({self.name!r}, size={self.size}, folder={str(self.folder)!r})"


def ensure_default_index(cache: Path, encoder: Encoder, *, progress: bool = True) -> Path:
    """The Python reference index for `encoder` in the cache, built (~650 passages) when missing.

    A default index that is damaged or was built with another encoder is derived data: rebuild it.
    """
    out = paths.default_index_dir(cache)
    if bundle.exists(out):
        try:
            version, manifest = bundle.open_bundle(out, "index", required=REQUIRED)
            check_store_format(version, manifest, out)
            check_encoder(out, manifest, encoder.fingerprint, encoder.name)
            return out
        except BundleError as e:
            LOG.warning("rebuilding the default index: %s", e)
    LOG.info("building the default index %s with %s", out, encoder.name)
    return build_index(
        default_corpus(),
        encoder,
        out,
        progress=progress,
        overwrite=True,
        name=paths.DEFAULT_INDEX,
    )
