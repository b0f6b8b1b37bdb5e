"""Index bundles with a tiny real encoder and real FAISS: sources, chunking, build, load, search."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from tiny_encoder import TRAINING_TEXT, tiny_encoder_bundle

from ragmix.errors import BundleError, NotFoundError, ValidationError
from ragmix.index import IndexBundle, build_index, default_corpus, read_sources
from ragmix.index.chunking import chunk_words
from ragmix.index.store import Passage, slug
from ragmix.models import bundle
from ragmix.models.encoder import Encoder

pytest.importorskip("torch")

VOCAB = sorted(set(TRAINING_TEXT.lower().replace(".", " ").replace(",", " ").split()))


def words(n: int, seed: int) -> str:
    """n words the tiny tokenizer knows, in a seed-specific order, with a newline every 12."""
    rng = random.Random(seed)
    out = [rng.choice(VOCAB) for _ in range(n)]
    return "\n".join(" ".join(out[i : i + 12]) for i in range(0, n, 12))


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir: Path) -> Encoder:
    return Encoder.load(tiny_encoder_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    (root / "notes.txt").write_text(words(250, 1))
    (root / "guide.md").write_text("Intro line.\n\n# Loop Statements\n\n" + words(150, 2))
    rows = [
        {"title": "Generators", "text": words(90, 3), "id": "gen-1"},
        {"title": "Context managers", "text": words(230, 4), "id": "ctx"},
        {"title": "Generators", "text": words(40, 5)},
    ]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    folder = root / "folder"
    (folder / "deeper").mkdir(parents=True)
    (folder / "b.txt").write_text(words(120, 6))
    (folder / "deeper" / "a.md").write_text(words(60, 7))
    (folder / "ignored.docx").write_bytes(b"PK\x03\x04")  # not a source type
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text(words(30, 8))
    return [root / "notes.txt", root / "guide.md", root / "rows.jsonl", folder]


@pytest.fixture(scope="module")
def index_dir(
    encoder: Encoder, corpus: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("idx") / "small"
    return build_index(read_sources(corpus), encoder, out, batch_size=4, progress=False)


# chunking ------------------------------------------------------------------------------------


def test_chunks_are_100_words_and_keep_newlines() -> None:
    text = words(250, 0)
    chunks = chunk_words(text)
    assert [len(c.split()) for c in chunks] == [100, 100, 50]
    assert all("\n" in c for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())


def test_short_tail_joins_the_previous_chunk() -> None:
    assert [len(c.split()) for c in chunk_words(words(210, 0))] == [100, 110]
    assert [len(c.split()) for c in chunk_words(words(30, 0))] == [30]
    assert chunk_words(" \n\t ") == []
    with pytest.raises(ValidationError, match="words_per_passage must be >= 1, got 0"):
        chunk_words("a b", 0)


def test_chunks_end_at_the_sentence_end_nearest_to_100_words() -> None:
    def sentence(n: int, i: int) -> str:
        return "Word " + " ".join(f"w{i}x{k}" for k in range(n - 1)) + "."

    # sentences of 30 words: ends after 90 and 120 words; 90 is nearer to 100
    text = " ".join(sentence(30, i) for i in range(10))
    chunks = chunk_words(text)
    assert [len(c.split()) for c in chunks] == [90, 90, 120]
    assert all(c.endswith(".") and c[0] == "W" for c in chunks)
    assert " ".join(chunks) == text  # whole words, nothing lost or doubled


def test_without_a_sentence_end_in_reach_the_cut_is_at_100_words_and_never_in_a_word() -> None:
    long_sentence = " ".join(["supercalifragilistic"] * 180) + "."
    chunks = chunk_words(long_sentence)
    assert [len(c.split()) for c in chunks] == [100, 80]
    assert all(w == "supercalifragilistic" for c in chunks for w in c.rstrip(".").split())


def test_abbreviations_and_decimals_are_not_sentence_ends_but_blank_lines_are() -> None:
    a = " ".join(["alpha"] * 85) + " e.g. beta 3.14 " + " ".join(["gamma"] * 20)
    b = " ".join(["delta"] * 40)
    chunks = chunk_words(f"{a}\n\n{b} end")
    assert chunks[0].endswith("gamma") and len(chunks[0].split()) == 108
    assert chunks[1].startswith("delta")


# sources -------------------------------------------------------------------------------------


def test_read_sources_titles_ids_and_folder_order(corpus: list[Path]) -> None:
    docs = list(read_sources(corpus))
    assert [d.title for d in docs] == [
        "notes",
        "Loop Statements",
        "Generators",
        "Context managers",
        "Generators",
        "b",
        "a",
    ]
    assert [d.id for d in docs][2:5] == ["gen-1", "ctx", None]
    assert docs[2].source.endswith("rows.jsonl:1")


def test_read_sources_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "doc.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValidationError, match=r"doc\.docx: unsupported file type '\.docx'"):
        list(read_sources([tmp_path / "doc.docx"]))
    with pytest.raises(ValidationError, match=r"missing\.txt does not exist"):
        list(read_sources([tmp_path / "missing.txt"]))
    (tmp_path / "bad.jsonl").write_text('{"title": "a", "text": "b"}\n{"title": 1}\n')
    with pytest.raises(ValidationError, match=r"bad\.jsonl:2: each line must be an object"):
        list(read_sources([tmp_path / "bad.jsonl"]))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValidationError, match=r"latin\.txt is not UTF-8"):
        list(read_sources([tmp_path / "latin.txt"]))


def test_default_corpus_is_the_python_reference() -> None:
    docs = list(default_corpus())
    assert 60 <= len(docs) <= 120
    titles = {d.title for d in docs}
    assert {"yield", "with", "for", "try"} <= titles
    assert sum(len(d.text.split()) for d in docs) > 40_000
    assert {d.source for d in docs} == {"pydoc_data.topics"}


# build and load ------------------------------------------------------------------------------


def test_build_writes_passages_with_readable_unique_ids(index_dir: Path) -> None:
    index = IndexBundle.load(index_dir)
    ids = [index.passage(r).id for r in range(index.size)]
    assert ids == [
        "notes:0", "notes:1", "notes:2",
        "loop-statements:0", "loop-statements:1",
        "gen-1",
        "ctx:0", "ctx:1", "ctx:2",
        "generators:0",
        "b:0",
        "a:0",
    ]  # fmt: skip
    lengths = [len(index.passage(r).text.split()) for r in range(index.size)]
    assert max(lengths) <= 125 and min(lengths) >= 25
    manifest = index.manifest
    assert manifest["passages"] == index.size == 12
    assert manifest["metric"] == "inner_product" and manifest["faiss_index"] == "Flat"
    assert manifest["index_type"] == index.index_type == "flat"
    assert set(manifest["files"]) == {"index.faiss", "passages.sqlite"}
    assert slug("The yield statement!") == "the-yield-statement"


def test_exact_duplicate_query_finds_its_passage(index_dir: Path, encoder: Encoder) -> None:
    index = IndexBundle.load(index_dir, encoder_fingerprint=encoder.fingerprint)
    texts = [index.passage(r).text for r in range(index.size)]
    queries = encoder.encode(texts)  # passages x dim
    scores, rows = index.search(queries, 3)  # passages x 3
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (index.size, 3)
    np.testing.assert_array_equal(rows[:, 0], np.arange(index.size))
    recomputed = np.einsum(
        "nkd,nd->nk", index.vectors(rows.ravel()).reshape(*rows.shape, -1), queries
    )
    np.testing.assert_allclose(scores, recomputed, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_k_is_clipped_to_the_index_size(index_dir: Path, encoder: Encoder) -> None:
    index = IndexBundle.load(index_dir)
    scores, rows = index.search(encoder.encode(["a loop"]), 50)
    assert rows.shape == scores.shape == (1, index.size)
    assert sorted(rows[0].tolist()) == list(range(index.size))
    with pytest.raises(ValidationError, match="k must be >= 1, got 0"):
        index.search(encoder.encode(["a loop"]), 0)
    with pytest.raises(ValidationError, match=r"shape \[n, 32\], got \[1, 5\]"):
        index.search(np.zeros((1, 5), dtype=np.float32), 1)


def test_rows_of_and_vectors(index_dir: Path, encoder: Encoder) -> None:
    index = IndexBundle.load(index_dir)
    rows = index.rows_of(["ctx:1", "gen-1"])
    assert [index.passage(r).id for r in rows] == ["ctx:1", "gen-1"]
    texts = [index.passage(r).text for r in rows]
    np.testing.assert_allclose(index.vectors(rows), encoder.encode(texts), atol=1e-5)
    with pytest.raises(NotFoundError, match="'nope:0', 'gone'"):
        index.rows_of(["ctx:0", "nope:0", "gone"])
    with pytest.raises(NotFoundError, match="out of range"):
        index.vectors([index.size])


def test_index_refuses_another_encoder(index_dir: Path, encoder: Encoder, tmp_path: Path) -> None:
    other = Encoder.load(tiny_encoder_bundle(tmp_path, seed=1))
    assert other.fingerprint != encoder.fingerprint
    with pytest.raises(BundleError) as err:
        IndexBundle.load(index_dir, encoder_fingerprint=other.fingerprint, encoder_name=other.name)
    message = str(err.value)
    assert f"built with encoder {encoder.name} (fingerprint {encoder.fingerprint[:12]}" in message
    assert f"loaded encoder {other.name} (fingerprint {other.fingerprint[:12]}" in message
    assert "ragmix index build" in message


def test_index_refuses_a_tampered_file(index_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(index_dir, tmp_path / "copy")
    con = sqlite3.connect(bundle.resolve(copy, "index") / "passages.sqlite")
    with con:
        con.execute("UPDATE passages SET id = 'notes:9' WHERE id = 'notes:0'")
    con.close()
    with pytest.raises(BundleError, match=r"checksum mismatch for passages\.sqlite"):
        IndexBundle.load(copy)


def test_the_passage_store_is_sqlite_with_rows_ids_and_sources(index_dir: Path) -> None:
    index = IndexBundle.load(index_dir)
    path = bundle.resolve(index_dir, "index") / "passages.sqlite"
    con = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    rows = con.execute(
        "SELECT row, id, title, text, source, seq FROM passages ORDER BY row"
    ).fetchall()
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    con.close()
    assert [r[0] for r in rows] == [r[5] for r in rows] == list(range(index.size))
    assert indexes  # the UNIQUE id index: passage_ids lookups are indexed queries
    for row, pid, title, text, source, _ in rows[:5]:
        assert index.passage(row) == Passage(pid, title, text, source)
        assert source.endswith((".txt", ".md", ".jsonl"))
    ids = [rows[3][1], rows[0][1]]
    assert index.rows_of(ids).tolist() == [3, 0]
    assert not (path.parent / "passages.sqlite-wal").exists()  # readers leave nothing behind


def test_an_index_from_before_the_sqlite_store_is_refused_with_the_fix(
    index_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(index_dir, tmp_path / "copy")
    version = bundle.resolve(copy, "index")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"]["passages.jsonl"] = manifest["files"].pop("passages.sqlite")
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"passages\.jsonl, the format of ragmix before"):
        IndexBundle.load(copy)


class FailingEncoder(Encoder):
    """A real encoder whose run fails, as a full disk or a killed worker would."""

    def encode(self, texts: Sequence[str], **kwargs: object) -> np.ndarray:
        raise RuntimeError("encoder failed mid-build")


def test_failed_build_leaves_nothing_behind(encoder: Encoder, corpus: list[Path], tmp_path: Path):
    failing = FailingEncoder(encoder.folder, encoder.manifest, encoder._session, encoder._tokenizer)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_index(read_sources(corpus), failing, tmp_path / "idx", progress=False)
    assert list(tmp_path.iterdir()) == []
    # A failed rebuild over an existing index keeps the old one intact.
    good = build_index(read_sources(corpus[:1]), encoder, tmp_path / "idx", progress=False)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_index(read_sources(corpus), failing, good, progress=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert IndexBundle.load(good).size == 3


def test_build_refuses_existing_out_empty_corpus_and_duplicate_ids(
    index_dir: Path, encoder: Encoder, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="already exists"):
        build_index(read_sources([tmp_path]), encoder, index_dir, progress=False)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ValidationError, match="no text to index"):
        build_index(read_sources([tmp_path]), encoder, tmp_path / "out", progress=False)
    (tmp_path / "dup.jsonl").write_text(
        json.dumps({"title": "a", "text": "one", "id": "x"})
        + "\n"
        + json.dumps({"title": "b", "text": "two", "id": "x"})
        + "\n"
    )
    with pytest.raises(
        ValidationError, match=r"passage id 'x' from .*dup\.jsonl:2 is already used"
    ):
        build_index(read_sources([tmp_path / "dup.jsonl"]), encoder, tmp_path / "o", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def pdf_with_pages(path: Path, title: str, pages: list[str]) -> Path:
    """A real, minimal PDF (one Helvetica text line per page, a correct xref table)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]  # the page tree is filled in below
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        content = len(objects) + 2
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
            f"/Resources << /Font << /F1 {len(pages) * 2 + 3} 0 R >> >> >>".encode()
        )
        kids.append(f"{len(objects)} 0 R")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects.append(f"<< /Title ({title}) >>".encode())
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\n" % (len(objects) + 1, len(objects))
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    path.write_bytes(bytes(out))
    return path


def test_html_and_pdf_sources_keep_their_text_title_and_page(encoder: Encoder, tmp_path: Path):
    html = tmp_path / "guide.html"
    html.write_text(
        "<html><head><title>Generators &amp; you</title><style>p{color:red}</style>"
        "<script>var hidden = 1;</script></head><body><h1>Ignored heading</h1>"
        "<p>A generator <b>yields</b> values lazily.</p><p>Caf\u00e9 &lt;ok&gt;</p></body></html>",
        encoding="utf-8",
    )
    pdf = pdf_with_pages(
        tmp_path / "manual.pdf", "Loop manual", ["For loops iterate.", "", "While loops wait."]
    )
    docs = list(read_sources([tmp_path]))
    by_source = {d.source: d for d in docs}
    page = by_source[f"{html}"]
    assert page.title == "Generators & you"
    assert page.text == "Ignored heading A generator yields values lazily. Caf\u00e9 <ok>"
    assert "hidden" not in page.text and "color" not in page.text
    assert by_source[f"{pdf}#page=1"].text.strip() == "For loops iterate."
    assert by_source[f"{pdf}#page=3"].text.strip() == "While loops wait."
    assert f"{pdf}#page=2" not in by_source  # a page without text gives no document
    assert {d.title for d in docs if d.source.startswith(str(pdf))} == {"Loop manual"}
    index = IndexBundle.load(build_index(docs, encoder, tmp_path / "idx", progress=False))
    sources = {index.passage(r).source for r in range(index.size)}
    assert sources == {str(html), f"{pdf}#page=1", f"{pdf}#page=3"}


def test_a_broken_pdf_is_refused_naming_the_file(tmp_path: Path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\nnot really")
    with pytest.raises(ValidationError, match=r"broken\.pdf is not a PDF pypdf can read"):
        list(read_sources([bad]))
