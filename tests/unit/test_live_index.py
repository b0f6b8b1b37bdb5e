"""Online changes to a loaded index, for every FAISS index type: added passages are found by id
and by their own vector, deleted ones never come back (after a reload, from a snapshot, from a
stale snapshot or from none), ids stay unique, and the log refuses what it was not written for.

Real FAISS over real tiny-encoder embeddings of the Python reference (~650 passages), in memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ragmix.errors import BundleError, ConflictError, NotFoundError
from ragmix.index import IndexBundle, Passage, SnapshotPolicy, build_index, default_corpus, live
from ragmix.index.types import IndexSpec
from ragmix.models.encoder import Encoder

SPECS = {
    "flat": IndexSpec("flat"),
    "hnsw": IndexSpec("hnsw", hnsw_m=16, ef_construction=64),
    "ivfpq": IndexSpec("ivfpq", nlist=16, pq_m=16, pq_bits=8),
}
NEW = [
    Passage("", "Walrus operator", "Assignment expressions name a value inside an expression."),
    Passage("pattern:0", "Match statement", "Structural pattern matching compares a subject."),
    Passage("", "Type hints", "Annotations document the types a function takes and returns."),
]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir: Path) -> Encoder:
    return Encoder.load(tiny_encoder_dir, threads=1)


@pytest.fixture(scope="module")
def built(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("live")
    return {
        name: build_index(default_corpus(), encoder, out / name, progress=False, spec=spec)
        for name, spec in SPECS.items()
    }


@pytest.fixture(params=sorted(SPECS))
def bundle_dir(request, built: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the built bundle: each test writes its own live folder."""
    return Path(shutil.copytree(built[request.param], tmp_path / request.param))


def top(index: IndexBundle, vectors: np.ndarray, k: int = 5) -> list[list[int]]:
    _, rows = index.search(vectors, k)
    return [[int(r) for r in row if r >= 0] for row in rows]


def test_added_passages_are_found_by_id_and_by_their_own_vector(bundle_dir, encoder):
    index = IndexBundle.load(bundle_dir, writable=True)
    built = index.size
    vectors = encoder.encode([p.text for p in NEW])
    ids, seq = index.add(NEW, vectors)
    assert seq == 3 and ids[1] == "pattern:0"
    assert ids[0] == f"walrus-operator@{built}" and ids[2] == f"type-hints@{built + 2}"
    assert index.passages == index.size == built + 3
    rows = index.rows_of(ids)
    assert rows.tolist() == [built, built + 1, built + 2]
    assert [index.passage(r).text for r in rows] == [p.text for p in NEW]
    approximate = index.index_type == "ivfpq"
    stored = index.vectors(rows)
    np.testing.assert_allclose(stored, vectors, atol=0.25 if approximate else 1e-6)
    if approximate:
        # IVF-PQ scores codes: the tiny encoder's vectors lie so close together (top scores
        # 0.96-1.0) that a row's rank under its own vector varies with the trained codebook
        # (first to ~120th seen). What must hold: the row is in the index, scored by its code.
        scores, found = index.search(vectors, index.size)  # nprobe 16 = nlist: every list
        for i, row in enumerate(rows):
            assert row in found[i]
            at = found[i].tolist().index(row)
            assert scores[i, at] == pytest.approx(float(stored[i] @ vectors[i]), abs=1e-3)
    else:
        for row, hits in zip(rows, top(index, vectors, k=1), strict=True):
            assert row in hits
    index.close()


def test_deleted_passages_never_come_back(bundle_dir, encoder):
    index = IndexBundle.load(bundle_dir, writable=True, snapshot_policy=SnapshotPolicy(changes=2))
    built = index.size
    vectors = encoder.encode([p.text for p in NEW])
    ids, _ = index.add(NEW, vectors)
    base_ids = [index.passage(r).id for r in (0, 1)]
    base_vectors = index.vectors([0, 1])
    assert index.snapshot_in() == 0.0  # 3 changes >= 2
    index.snapshot()  # the snapshot holds the added vectors, not the deletions below
    deleted, missing, seq = index.delete([ids[0], base_ids[0], "no-such:0", ids[0]])
    assert deleted == [ids[0], base_ids[0]] and missing == ["no-such:0"] and seq == 5
    assert index.passages == built + 1

    def check(index: IndexBundle) -> None:
        assert index.passages == built + 1 and index.size == built + 3
        gone = {built, 0}
        for hits in top(index, np.concatenate([vectors, base_vectors]), k=20):
            assert not gone & set(hits)
        with pytest.raises(NotFoundError, match="unknown passage id"):
            index.rows_of([ids[0]])
        assert index.rows_of([ids[1], base_ids[1]]).tolist() == [built + 1, 1]

    check(index)
    index.close()
    check(IndexBundle.load(bundle_dir))  # read-only, from the snapshot + log
    (live.live_folder(_version(bundle_dir)) / live.SNAPSHOT_FILE).unlink()
    check(IndexBundle.load(bundle_dir))  # no snapshot: the whole log replayed


def test_a_stale_or_unreadable_snapshot_is_replaced_by_the_log(bundle_dir, encoder):
    index = IndexBundle.load(bundle_dir, writable=True)
    vectors = encoder.encode([p.text for p in NEW])
    index.add(NEW[:1], vectors[:1])
    index.snapshot()
    ids, _ = index.add(NEW[1:], vectors[1:])  # after the snapshot: only in the log
    index.delete([ids[0]])
    abandon(index)  # as if killed: no final snapshot; the log holds what the snapshot lacks
    again = IndexBundle.load(bundle_dir, writable=True)
    assert again.size == index.size and again.passages == index.passages
    assert again.find(ids) == {ids[1]: index.size - 1}
    again.close()
    snap = live.live_folder(_version(bundle_dir)) / live.SNAPSHOT_FILE
    snap.write_bytes(b"not a faiss index")
    third = IndexBundle.load(bundle_dir)
    assert third.size == index.size and third.find(ids) == {ids[1]: index.size - 1}


def test_ids_stay_unique_and_a_deleted_id_can_be_added_again(bundle_dir, encoder):
    index = IndexBundle.load(bundle_dir, writable=True)
    vectors = encoder.encode([p.text for p in NEW])
    existing = index.passage(3).id
    with pytest.raises(ConflictError, match="already in index"):
        index.add([Passage(existing, "t", "x")], vectors[:1])
    assert index.size == index.built  # nothing was added
    index.delete([existing])
    ids, _ = index.add([Passage(existing, "t", "new text")], vectors[:1])
    assert ids == [existing]
    assert index.passage(int(index.rows_of([existing])[0])).text == "new text"
    index.close()


def test_one_writer_and_a_log_only_for_its_own_build(bundle_dir, encoder, tmp_path):
    index = IndexBundle.load(bundle_dir, writable=True)
    with pytest.raises(BundleError, match="another server accepts changes"):
        IndexBundle.load(bundle_dir, writable=True)
    reader = IndexBundle.load(bundle_dir)  # readers need no lock
    assert not reader.writable
    with pytest.raises(BundleError, match="read-only"):
        reader.delete(["x"])
    index.add(NEW[:1], encoder.encode([NEW[0].text]))
    index.close()
    other = build_index(
        list(default_corpus())[:50], encoder, tmp_path / "other", progress=False,
        spec=SPECS["flat"],
    )  # fmt: skip
    shutil.copytree(live.live_folder(_version(bundle_dir)), live.live_folder(_version(other)))
    with pytest.raises(BundleError, match="written for another build"):
        IndexBundle.load(other)


def abandon(index: IndexBundle) -> None:
    """Let go of the log and the writer's lock without the final snapshot, as SIGKILL would."""
    index._changes.close()
    os.close(index._lock_fd)


def _version(bundle_dir: Path) -> Path:
    return bundle_dir / (bundle_dir / "CURRENT").read_text().strip()
