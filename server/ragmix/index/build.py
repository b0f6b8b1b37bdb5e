"""Building index bundles: chunk, embed, index, and write passages.sqlite + a FAISS
inner-product index + manifest.json as one new bundle version, atomically.

The manifest pins the encoder's fingerprint: an index searched with vectors from another encoder
returns confident nonsense, so loading refuses the mismatch (index/bundle.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ragmix import paths
from ragmix.errors import BundleError, ValidationError
from ragmix.index import types
from ragmix.index.bundle import (
    INDEX_FILE,
    PASSAGES_FILE,
    REQUIRED,
    check_encoder,
    check_store_format,
)
from ragmix.index.chunking import chunk_words
from ragmix.index.sources import Document, default_corpus
from ragmix.index.store import Passage, PassageIds, write_passages
from ragmix.index.types import IndexSpec
from ragmix.models import bundle

if TYPE_CHECKING:
    from ragmix.models.encoder import Encoder

LOG = logging.getLogger(__name__)


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
