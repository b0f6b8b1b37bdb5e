"""The retriever: the prior p_eta(z|x) over the top-K passages, batched across concurrent queries.

Queries that arrive together are embedded in one encoder run and searched in one FAISS call by a
single worker thread (encoder and index are used from that thread only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ragmix.engine.observer import EngineObserver
from ragmix.engine.outputs import RetrievedPassage
from ragmix.engine.params import RetrievalParams
from ragmix.errors import UnavailableError
from ragmix.index.types import SearchKnobs

if TYPE_CHECKING:
    from ragmix.index import IndexBundle
    from ragmix.models.encoder import Encoder

LOG = logging.getLogger(__name__)


def prior(scores: np.ndarray, temperature: float) -> np.ndarray:
    """p_eta(z_j|x) = softmax_j(score_j / tau), renormalised over the K retrieved (as HF's RAG)."""
    z = scores.astype(np.float64) / temperature  # K
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


class Retriever:
    def __init__(self, encoder: Encoder, index: IndexBundle) -> None:
        self.encoder = encoder
        self.index = index

    def check(self, params: RetrievalParams) -> None:
        """Refuse search knobs the index lacks (passage_ids requests do not search)."""
        if not params.passage_ids:
            self.index.check(params.knobs, params.top_k)

    def retrieve_batch(
        self, requests: Sequence[RetrievalParams]
    ) -> list[list[RetrievedPassage] | Exception]:
        """One encoder run and one FAISS search per set of search knobs (usually one) for the batch."""
        q = self.encoder.encode([r.query for r in requests])  # n x d
        out: list[list[RetrievedPassage] | Exception] = [[] for _ in requests]
        groups: dict[SearchKnobs, list[int]] = {}  # one FAISS call per set of search knobs
        for i, r in enumerate(requests):
            if not r.passage_ids:
                groups.setdefault(r.knobs, []).append(i)
        for knobs, search in groups.items():
            k = max(requests[i].top_k for i in search)
            scores, rows = self.index.search(q[search], k, knobs)  # n_search x k
            for n, i in enumerate(search):
                kk = min(requests[i].top_k, self.index.size)
                out[i] = self._passages(rows[n, :kk], scores[n, :kk], requests[i])
        for i, r in enumerate(requests):
            if r.passage_ids:
                try:
                    rows_i = self.index.rows_of(r.passage_ids)
                except Exception as e:  # NotFoundError names the ids; delivered to that request
                    out[i] = e
                    continue
                scores_i = self.index.vectors(rows_i) @ q[i]  # K
                out[i] = self._passages(rows_i, scores_i, r)
        return out

    def _passages(
        self, rows: np.ndarray, scores: np.ndarray, r: RetrievalParams
    ) -> list[RetrievedPassage]:
        keep = rows >= 0  # FAISS pads with -1 when the index has fewer than k passages
        rows, scores = rows[keep], scores[keep]
        p = prior(scores, r.retrieval_temperature)
        result = []
        for row, s, pj in zip(rows.tolist(), scores.tolist(), p.tolist(), strict=True):
            psg = self.index.passage(row)
            result.append(RetrievedPassage(psg.id, psg.title, psg.text, float(s), float(pj)))
        return result


class RetrievalBatcher:
    """A worker thread that drains the queue and retrieves everything waiting in one batch."""

    def __init__(
        self, retriever: Retriever, max_batch: int = 64, observer: EngineObserver | None = None
    ) -> None:
        self.retriever = retriever
        self.max_batch = max_batch
        self._queue: queue.Queue[
            tuple[RetrievalParams, concurrent.futures.Future[tuple[list[RetrievedPassage], float]]]
            | None
        ] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ragmix-retrieval", daemon=True)
        self._closed = False
        self.observer = observer or EngineObserver()
        self._thread.start()

    async def retrieve(self, params: RetrievalParams) -> tuple[list[RetrievedPassage], float]:
        """(passages, retrieval milliseconds) for one request; raises what the batch raised for it."""
        if self._closed:
            raise UnavailableError("the server is shutting down; retry on another replica.")
        self.retriever.check(params)  # before any event
        fut: concurrent.futures.Future[tuple[list[RetrievedPassage], float]] = (
            concurrent.futures.Future()
        )
        self._queue.put((params, fut))
        return await asyncio.wrap_future(fut)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            batch = [(p, f) for p, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = self.retriever.retrieve_batch([p for p, _ in batch])
            except Exception as e:
                LOG.exception("retrieval batch of %d failed", len(batch))
                for _, f in batch:
                    f.set_exception(e)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            self.observer.on_retrieval(len(batch), ms / 1e3)
            for (_, f), res in zip(batch, results, strict=True):
                if isinstance(res, Exception):
                    f.set_exception(res)
                else:
                    f.set_result((res, ms))
