"""Every FAISS index type round-trips through a bundle and finds what exact search finds.

Real FAISS over real tiny-encoder embeddings of ~2,200 passages (the Python reference in 30-word
chunks), fixed seeds: recall@10 of HNSW and IVF-PQ against the flat index, the score each returns
against the inner product it stands for, and the query-time knobs with their refusals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragmix.errors import ValidationError
from ragmix.index import IndexBundle, build_index, default_corpus
from ragmix.index.types import FLAT_BELOW, MAX_EF_SEARCH, IndexSpec, SearchKnobs
from ragmix.models.encoder import Encoder

K = 10


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir: Path) -> Encoder:
    return Encoder.load(tiny_encoder_dir, threads=1)


@pytest.fixture(scope="module")
def built(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, IndexBundle]:
    docs = list(default_corpus())
    out = tmp_path_factory.mktemp("types")
    specs = {
        "flat": IndexSpec("flat"),
        "hnsw": IndexSpec("hnsw", hnsw_m=16, ef_construction=100),
        "ivfpq": IndexSpec("ivfpq", nlist=32, pq_m=16, pq_bits=8),
    }
    return {
        name: IndexBundle.load(
            build_index(docs, encoder, out / name, words_per_passage=30, progress=False, spec=spec)
        )
        for name, spec in specs.items()
    }


@pytest.fixture(scope="module")
def queries(encoder: Encoder) -> np.ndarray:
    questions = [d.title + " statement in Python" for d in default_corpus()][:60]
    return encoder.encode(questions)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approx, exact, strict=True)]))


def test_the_corpus_is_a_few_thousand_passages_and_auto_would_pick_flat(built):
    sizes = {b.size for b in built.values()}
    assert len(sizes) == 1 and 2_000 <= sizes.pop() < FLAT_BELOW
    assert IndexSpec().resolved(2_000, 32).type == "flat"
    assert IndexSpec().resolved(FLAT_BELOW, 32).type == "hnsw"
    assert IndexSpec().resolved(3_000_000, 384).factory() == "IVF6928,PQ48x8"


def test_each_type_round_trips_with_its_manifest(built):
    for name, idx in built.items():
        assert idx.index_type == name == idx.manifest["index_type"]
    assert built["flat"].manifest["faiss_index"] == "Flat"
    assert built["hnsw"].manifest["index"]["parameters"] == {"M": 16, "efConstruction": 100}
    ivf = built["ivfpq"].manifest["index"]
    assert ivf["factory"] == "IVF32,PQ16x8" and built["ivfpq"].nlist == 32
    # PQ's 256 centroids per sub-quantiser want 256 x 39 points: the whole corpus here.
    assert ivf["training"]["vectors"] == built["ivfpq"].size and ivf["training"]["seed"] == 0


def test_hnsw_finds_what_exact_search_finds_and_scores_exactly(built, queries):
    _, exact = built["flat"].search(queries, K)
    scores, rows = built["hnsw"].search(queries, K)
    print(f"HNSW recall@10 at efSearch 64: {recall(rows, exact)}")
    assert recall(rows, exact) >= 0.95
    vectors = built["flat"].vectors(rows.ravel()).reshape(*rows.shape, -1)  # queries x K x dim
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", vectors, queries), atol=1e-5)
    # A candidate list longer than the index never fills, so the search visits every passage.
    exact_scores, _ = built["flat"].search(queries, K)
    everything, _ = built["hnsw"].search(queries, K, SearchKnobs(ef_search=MAX_EF_SEARCH))
    np.testing.assert_allclose(everything, exact_scores, atol=1e-5)  # by score: near-ties


def test_ivfpq_recall_grows_with_nprobe_and_scores_are_its_reconstructions(built, queries):
    _, exact = built["flat"].search(queries, K)
    ivf = built["ivfpq"]
    by_nprobe = {
        n: recall(ivf.search(queries, K, SearchKnobs(nprobe=n))[1], exact) for n in (1, 32)
    }
    print(f"IVF-PQ recall@10 by nprobe: {by_nprobe}")
    assert by_nprobe[1] < by_nprobe[32] and by_nprobe[32] >= 0.6, by_nprobe
    scores, rows = ivf.search(queries, K, SearchKnobs(nprobe=32))
    decoded = ivf.vectors(rows.ravel()).reshape(*rows.shape, -1)  # what the codes stand for
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", decoded, queries), atol=1e-4)
    exact_vectors = built["flat"].vectors(rows.ravel()).reshape(*rows.shape, -1)
    true = np.einsum("qkd,qd->qk", exact_vectors, queries)
    assert np.abs(scores - true).max() < 0.2  # quantised, but close to d(z)·q(x)


def test_knobs_are_refused_where_the_index_lacks_them_or_out_of_range(built):
    with pytest.raises(ValidationError, match="nprobe applies to ivfpq"):
        built["flat"].check(SearchKnobs(nprobe=4), K)
    with pytest.raises(ValidationError, match="ef_search applies to hnsw"):
        built["ivfpq"].check(SearchKnobs(ef_search=64), K)
    with pytest.raises(ValidationError, match=r"nprobe must be in \[1, 32\]"):
        built["ivfpq"].check(SearchKnobs(nprobe=33), K)
    with pytest.raises(ValidationError, match=r"ef_search must be in \[top_k = 10"):
        built["hnsw"].check(SearchKnobs(ef_search=9), K)
    built["hnsw"].check(SearchKnobs(ef_search=10), K)
    built["ivfpq"].check(SearchKnobs(nprobe=32), K)


def test_build_parameters_are_checked_before_encoding(encoder, tmp_path):
    docs = list(default_corpus())[:3]
    for spec, field in [
        (IndexSpec("ivfpq", pq_m=5), "pq_m"),
        (IndexSpec("ivfpq", nlist=10**6), "nlist"),
        (IndexSpec("hnsw", hnsw_m=2), "hnsw_m"),
        (IndexSpec("annoy"), "index_type"),
    ]:
        with pytest.raises(ValidationError) as err:
            build_index(docs, encoder, tmp_path / "x", progress=False, spec=spec)
        assert err.value.param == field
        assert not (tmp_path / "x").exists()
