"""The GPU search copy's handling of deleted rows (over-fetch k + d, drop the deleted), exercised
here with a CPU flat index standing in for the GPU one (same FAISS search API), against the CPU
index's own selector path; and the placement rules for where FAISS searches."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from ragmix.index.gpu import GpuFlat, gpus
from ragmix.index.tombstones import Tombstones
from ragmix.index.types import SearchKnobs, search_parameters


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stand_in(index: faiss.Index) -> GpuFlat:
    """A GpuFlat whose search copy is a CPU flat index (no GPU here)."""
    copy = GpuFlat.__new__(GpuFlat)
    copy.device, copy._index = 0, faiss.clone_index(index)
    return copy


@pytest.mark.parametrize("deleted", [0, 1, 40, 299])
def test_over_fetch_equals_the_selector_search(deleted: int) -> None:
    rng = np.random.default_rng(deleted)
    vectors, queries = unit(rng, 300, 16), unit(rng, 7, 16)
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    gone = Tombstones(rng.choice(300, deleted, replace=False) if deleted else None)
    params = search_parameters("flat", SearchKnobs(), SearchKnobs(), 5, gone.selector())
    want_scores, want_rows = index.search(queries, 5, params=params)
    got_scores, got_rows = stand_in(index).search(queries, 5, gone.masked, len(gone))
    np.testing.assert_array_equal(got_rows, want_rows)
    live = want_rows >= 0
    np.testing.assert_allclose(got_scores[live], want_scores[live], rtol=1e-6)
    assert not gone.masked(got_rows[got_rows >= 0]).any()
    assert (got_rows[:, :1] >= 0).all()  # 1 row left when 299 of 300 are deleted


def test_added_vectors_are_searched_in_the_copy_too() -> None:
    rng = np.random.default_rng(1)
    index = faiss.IndexFlatIP(8)
    index.add(unit(rng, 20, 8))
    copy = stand_in(index)
    extra = unit(rng, 1, 8)
    copy.add(extra)
    _, rows = copy.search(extra, 1, Tombstones(None).masked, 0)
    assert rows[0, 0] == 20 and copy.ntotal == 21


def test_where_faiss_searches() -> None:
    index = faiss.IndexFlatIP(8)
    assert GpuFlat.of(index, "flat", None) is None  # --device cpu
    assert GpuFlat.of(faiss.IndexHNSWFlat(8, 4), "hnsw", 0) is None  # no GPU HNSW in FAISS
    if gpus() == 0:  # faiss-cpu: the CPU index, with a log line saying why
        assert GpuFlat.of(index, "flat", 0) is None
    else:
        assert GpuFlat.of(index, "flat", 0).device == 0


def test_k_past_the_gpu_limit_goes_to_the_cpu() -> None:
    copy = stand_in(faiss.IndexFlatIP(4))
    assert copy.can_search(2000, 48) and not copy.can_search(2000, 49)
