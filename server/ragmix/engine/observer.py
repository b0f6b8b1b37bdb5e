"""Hooks the engine calls as it works, so metrics live in the service layer, not in the token loop.

The default does nothing; the service installs a Prometheus-backed subclass. Every hook is called
from the engine thread (or the retrieval thread) and must return quickly.
"""

from __future__ import annotations


class EngineObserver:
    def on_step(self, rows: int, requests: int, seconds: float) -> None:
        """One token-loop step over `rows` passage rows of `requests` requests took `seconds`."""

    def on_queue(self, waiting: int, running: int, rows: int) -> None:
        """Queue depth, running requests and active rows after a step or an admission."""

    def on_prefill(self, rows: int, tokens: int, cached_tokens: int, seconds: float) -> None:
        """A prefill of `rows` prompts: `tokens` computed, `cached_tokens` taken from the cache."""

    def on_first_token(self, seconds: float) -> None:
        """Time from a request's arrival to its first token."""

    def on_inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of one request."""

    def on_retrieval(self, batch: int, seconds: float) -> None:
        """One batched retrieval (encode + search) of `batch` queries."""

    def on_passage_cache(self, hits: int, misses: int, bytes_used: int, entries: int) -> None:
        """Passage prefix cache lookups of one admission, and the cache's size after it."""

    def on_finish(self, reason: str, generated_tokens: int) -> None:
        """A request ended: 'length', 'eos', 'stop', 'cancelled' or 'error'."""

    def on_index_change(self, kind: str, passages: int, searchable: int) -> None:
        """`passages` passages were added or deleted (kind 'add' or 'delete'; 0 at load);
        `searchable` is what a search can now return."""

    def on_snapshot(self, seconds: float) -> None:
        """The index writer saved its FAISS snapshot, in `seconds` (searches wait meanwhile)."""
