"""The real default encoder (all-MiniLM-L6-v2) and the default Python reference index.

Both are built into the ragmix cache on first use (RAGMIX_CACHE_DIR picks another place), the way
`ragmix serve` with no paths builds them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from ragmix import paths
from ragmix.index import IndexBundle, default_corpus
from ragmix.index.build import ensure_default_index
from ragmix.models import bundle
from ragmix.models.encoder import Encoder
from ragmix.models.encoder_export import export_encoder, find_default_encoder_source

pytestmark = pytest.mark.e2e
LOG = logging.getLogger(__name__)

QUERIES = [
    "What does the yield statement do?",
    "How do I catch an exception?",
    "a",
    "How does the with statement use a context manager's __enter__ and __exit__ methods? " * 12,
]


@pytest.fixture(scope="module")
def cache() -> Path:
    return paths.cache_dir()


@pytest.fixture(scope="module")
def encoder(cache: Path) -> Encoder:
    folder = paths.default_encoder_dir(cache)
    if not bundle.exists(folder):
        started = time.perf_counter()
        export_encoder(find_default_encoder_source(), folder)
        LOG.warning("exported the default encoder in %.1f s", time.perf_counter() - started)
    return Encoder.load(folder)


@pytest.fixture(scope="module")
def index(cache: Path, encoder: Encoder) -> IndexBundle:
    started = time.perf_counter()
    folder = ensure_default_index(cache, encoder, progress=False)
    LOG.warning("default index ready in %.1f s", time.perf_counter() - started)
    return IndexBundle.load(folder, encoder_fingerprint=encoder.fingerprint)


def test_default_encoder_matches_sentence_transformers_recipe(encoder: Encoder) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    src = find_default_encoder_source()
    model = transformers.AutoModel.from_pretrained(src).eval()
    tokenizer = Tokenizer.from_file(str(encoder.folder / "tokenizer.json"))
    enc = tokenizer.encode_batch(QUERIES)
    ids = torch.tensor([e.ids for e in enc])  # batch x seq
    mask = torch.tensor([e.attention_mask for e in enc])  # batch x seq
    assert ids.shape[1] > 128  # the packaged 128-token cap is lifted to sentence-transformers' 256
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # batch x seq x 384
    m = mask.unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1).numpy()
    got = encoder.encode(QUERIES, batch_size=2)
    assert got.shape == (len(QUERIES), 384) and encoder.dimension == 384
    error = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)  # queries
    assert error.max() <= 1e-4


def test_default_index_answers_a_yield_question(index: IndexBundle, encoder: Encoder) -> None:
    n_topics = len(list(default_corpus()))
    assert index.size > n_topics  # most topics span several ~100-word passages
    scores, rows = index.search(encoder.encode(QUERIES[:2]), 5)  # 2 x 5
    top = index.passage(rows[0, 0])
    assert top.title == "yield" and top.id.startswith("yield:")
    # raise, try and exceptions passages score within 0.01 of each other for this question
    assert {index.passage(r).title for r in rows[1, :3]} & {"try", "exceptions"}
    assert 0.0 < scores[0, 0] <= 1.0 + 1e-5
