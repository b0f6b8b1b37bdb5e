"""Index administration: check a change, embed it off the event loop, apply it on the retrieval
worker (which owns the index), report what the index holds.

Everything that can refuse a change does so before it is embedded; a change that is refused
while being applied (an id already taken) changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ragmix.engine.observer import EngineObserver
from ragmix.engine.retrieval import RetrievalBatcher
from ragmix.errors import BundleError, ValidationError, shown
from ragmix.index.bundle import IndexBundle, IndexCounts
from ragmix.index.store import Passage

MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 1000
MAX_SOURCE_CHARS = 2000


@dataclass(frozen=True)
class AdminLimits:
    max_batch: int = 256  # passages per add, ids per delete
    max_text_chars: int = 20_000


@dataclass(frozen=True)
class Added:
    ids: list[str]
    passages: int  # searchable after the change
    sequence: int


@dataclass(frozen=True)
class Deleted:
    deleted: list[str]
    not_found: list[str]
    passages: int
    sequence: int


def _batch(name: str, n: int, limits: AdminLimits) -> None:
    if not 1 <= n <= limits.max_batch:
        raise ValidationError(name, f"{name} must hold 1 to {limits.max_batch} items, got {n}.")


def _text(name: str, i: int, value: str, hi: int, required: bool = False) -> None:
    field = f"{name}[{i}]"
    if required and not value.strip():
        raise ValidationError(field, f"{field} is empty; a passage needs text to embed.")
    if len(value) > hi:
        raise ValidationError(
            field, f"{field} must be at most {hi} characters, got {len(value)} characters."
        )


def check_ids(ids: Sequence[str], limits: AdminLimits, name: str = "ids") -> None:
    _batch(name, len(ids), limits)
    for i, pid in enumerate(ids):
        if not pid.strip() or pid != pid.strip():
            raise ValidationError(
                f"{name}[{i}]",
                f"{name}[{i}] must be a non-empty id without surrounding spaces, got {shown(pid)}.",
            )
        _text(name, i, pid, MAX_ID_CHARS)


def check_new_passages(passages: Sequence[Passage], limits: AdminLimits) -> None:
    """Sizes, empty texts, and ids given twice in one request (INVALID_ARGUMENT)."""
    _batch("passages", len(passages), limits)
    for i, p in enumerate(passages):
        _text("passages.text", i, p.text, limits.max_text_chars, required=True)
        _text("passages.title", i, p.title, MAX_TITLE_CHARS)
        _text("passages.source", i, p.source, MAX_SOURCE_CHARS)
    named = [p.id for p in passages if p.id]
    if named:
        check_ids(named, AdminLimits(len(named)), "passages.id")
    twice = sorted({i for i in named if named.count(i) > 1})
    if twice:
        raise ValidationError(
            "passages.id", f"passage id {shown(twice[0])} is given more than once in the request."
        )


class IndexAdmin:
    """The engine's half of ragmix.v1.IndexAdmin."""

    def __init__(
        self,
        retrieval: RetrievalBatcher,
        limits: AdminLimits,
        check_accepting: Callable[[], None] = lambda: None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.retrieval = retrieval
        self.limits = limits
        self.observer = observer or EngineObserver()
        self.observer.on_index_change("load", 0, self._index.passages)
        self._check_accepting = check_accepting  # UnavailableError while the server drains

    @property
    def _index(self) -> IndexBundle:
        return self.retrieval.retriever.index

    def _check_writable(self) -> None:
        self._check_accepting()
        if not self._index.writable:
            raise BundleError(
                f"index {self._index.name} is served read-only; start the server with "
                "--admin-token-file to change it."
            )

    async def add(self, passages: Sequence[Passage]) -> Added:
        """Embed and add passages, durable when this returns."""
        check_new_passages(passages, self.limits)
        self._check_writable()
        encoder = self.retrieval.retriever.encoder
        vectors = await asyncio.to_thread(encoder.encode, [p.text for p in passages])

        def apply() -> Added:
            ids, seq = self._index.add(passages, vectors)
            return Added(ids, self._index.passages, seq)

        added = await self.retrieval.change(apply)
        self.observer.on_index_change("add", len(added.ids), added.passages)
        return added

    async def delete(self, ids: Sequence[str]) -> Deleted:
        """Delete passages by id, durable when this returns; unknown ids are reported."""
        check_ids(ids, self.limits)
        self._check_writable()

        def apply() -> Deleted:
            deleted, missing, seq = self._index.delete(ids)
            return Deleted(deleted, missing, self._index.passages, seq)

        deleted = await self.retrieval.change(apply)
        self.observer.on_index_change("delete", len(deleted.deleted), deleted.passages)
        return deleted

    async def stats(self) -> IndexCounts:
        return await self.retrieval.change(self._index.counts)
