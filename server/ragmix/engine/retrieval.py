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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

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
T = TypeVar("T")


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


@dataclass
class _Search:
    params: RetrievalParams
    future: concurrent.futures.Future[tuple[list[RetrievedPassage], float]]


@dataclass
class _Change:
    apply: Callable[[], object]
    future: concurrent.futures.Future[object]


class _Stop:
    """Queued by close(): the worker ends after what was queued before it."""


_STOP = _Stop()
SNAPSHOT_RETRY_S = 30.0
"""After a snapshot fails (a full disk), the wait before the next try; the log still holds every
change, so serving goes on."""


class RetrievalBatcher:
    """The one thread that uses the encoder and the index: it drains the queue, retrieves every
    waiting query in one batch, applies index changes in order between batches (a change
    acknowledged before a request is queued is seen by it), and saves snapshots when due."""

    def __init__(
        self, retriever: Retriever, max_batch: int = 64, observer: EngineObserver | None = None
    ) -> None:
        self.retriever = retriever
        self.max_batch = max_batch
        self._queue: queue.Queue[_Search | _Change | _Stop] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ragmix-retrieval", daemon=True)
        self._closed = False
        self._snapshot_retry_at = 0.0
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
        self._queue.put(_Search(params, fut))
        return await asyncio.wrap_future(fut)

    async def change(self, apply: Callable[[], T]) -> T:
        """Run `apply` (a change to the index) on the worker thread, between retrieval batches."""
        if self._closed:
            raise UnavailableError("the server is shutting down; retry on another replica.")
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._queue.put(_Change(apply, fut))
        return await asyncio.wrap_future(fut)  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker after what is queued; it saves a last snapshot of unsaved changes."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=300)

    # --------------------------------------------------------------- the worker thread

    def _run(self) -> None:
        item = self._next()
        while not isinstance(item, _Stop):
            if isinstance(item, _Change):
                self._apply(item)
                item = self._next()
                continue
            batch, after = self._batch(item)
            self._search(batch)
            item = after if after is not None else self._next()
        try:
            self.retriever.index.close()
        except Exception:
            LOG.exception("closing index %s failed", self.retriever.index.name)

    def _batch(self, first: _Search) -> tuple[list[_Search], _Change | _Stop | None]:
        """`first` and the searches queued right behind it, up to max_batch; and the change or
        stop that ended the run of searches, if one did (it goes after this batch)."""
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return batch, None
            if not isinstance(nxt, _Search):
                return batch, nxt
            batch.append(nxt)
        return batch, None

    def _next(self) -> _Search | _Change | _Stop:
        """The next queued item; while waiting, the snapshot when one falls due."""
        while True:
            due = self.retriever.index.snapshot_in()
            if due is not None:
                due = max(due, self._snapshot_retry_at - time.monotonic())
            try:
                return self._queue.get(timeout=due)
            except queue.Empty:
                self._snapshot()

    def _snapshot(self) -> None:
        t0 = time.perf_counter()
        try:
            self.retriever.index.snapshot()
            self.observer.on_snapshot(time.perf_counter() - t0)
        except Exception:
            LOG.exception(
                "snapshot of index %s failed; retrying in %.0f s (every change is in the log)",
                self.retriever.index.name,
                SNAPSHOT_RETRY_S,
            )
            self._snapshot_retry_at = time.monotonic() + SNAPSHOT_RETRY_S

    def _apply(self, change: _Change) -> None:
        if not change.future.set_running_or_notify_cancel():
            return
        try:
            result = change.apply()
        except Exception as e:  # refusals (ConflictError) and failures go to the caller
            change.future.set_exception(e)
            return
        change.future.set_result(result)
        if self.retriever.index.snapshot_in() == 0.0 and time.monotonic() >= (
            self._snapshot_retry_at
        ):
            self._snapshot()

    def _search(self, batch: list[_Search]) -> None:
        batch = [b for b in batch if b.future.set_running_or_notify_cancel()]
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            results = self.retriever.retrieve_batch([b.params for b in batch])
        except Exception as e:
            LOG.exception("retrieval batch of %d failed", len(batch))
            for b in batch:
                b.future.set_exception(e)
            return
        ms = (time.perf_counter() - t0) * 1e3
        self.observer.on_retrieval(len(batch), ms / 1e3)
        for b, res in zip(batch, results, strict=True):
            if isinstance(res, Exception):
                b.future.set_exception(res)
            else:
                b.future.set_result((res, ms))
