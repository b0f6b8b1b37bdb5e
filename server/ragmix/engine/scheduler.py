"""Who runs in a step: the waiting queue, admission within the limits, and the prefill chunk.

Admission is FIFO without overtaking and reserves each request's worst case: its most decode rows
(K, 1 for Concat, K x num_beams for RAG-Sequence) until its longest row ends. The running batch's
KV is rows x length with rows right-aligned, so its size never exceeds
(sum of reserved rows) x (the longest row any running request can reach), kept <= max_batch_tokens.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from ragmix.engine.prefill import Chunk, PrefillRow, plan_chunk
from ragmix.engine.request import Request
from ragmix.errors import OverloadedError


@dataclass(frozen=True)
class SchedulerLimits:
    max_concurrent_requests: int  # requests admitted (prefilling, decoding or rescoring)
    max_queued_requests: int  # requests waiting for admission
    max_batch_rows: int  # decode rows reserved by the admitted requests
    max_batch_tokens: int  # KV slots (rows x length) the running batch may reach
    max_prefill_tokens: int  # the cost (prefill.pass_cost) one step's prefill pass may have


class Scheduler:
    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.waiting: collections.deque[Request] = collections.deque()

    def check_capacity(self, running: Sequence[Request]) -> None:
        """Refuse a new request at once when the queue is full (RESOURCE_EXHAUSTED).

        Cancelled requests do not count: the next step drops them, and a client that cancels and
        retries at once (a storm of cancellations) would otherwise be refused by its own ghosts.
        """
        lim = self.limits
        live = sum(not r.cancelled for r in running)
        waiting = sum(not r.cancelled for r in self.waiting)
        free = max(lim.max_concurrent_requests - live, 0)
        if waiting - free >= lim.max_queued_requests:
            raise OverloadedError(
                f"the server is at capacity ({lim.max_concurrent_requests} running, "
                f"{waiting} queued, max_queued_requests={lim.max_queued_requests}); "
                "retry later."
            )

    def admit(self, running: Sequence[Request]) -> tuple[list[Request], list[Request]]:
        """Pop the waiting requests that fit beside `running` (FIFO, no overtaking), and every
        cancelled one wherever it waits: (admitted, cancelled). One cancelled after this pass is
        admitted and dropped from the running batch at the next step."""
        cancelled = [r for r in self.waiting if r.cancelled]
        if cancelled:
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        lim = self.limits
        rows = sum(r.max_rows for r in running)
        longest = max((r.max_length for r in running if r.max_rows), default=0)
        count = len(running)
        admitted: list[Request] = []
        while self.waiting:
            r = self.waiting[0]
            new_rows = rows + r.max_rows
            new_longest = max(longest, r.max_length) if r.max_rows else longest
            if count >= lim.max_concurrent_requests or new_rows > lim.max_batch_rows:
                break
            if count and new_rows * new_longest > lim.max_batch_tokens:
                break
            admitted.append(self.waiting.popleft())
            rows, longest, count = new_rows, new_longest, count + 1
        return admitted, cancelled

    def chunk(self, running: Sequence[Request]) -> tuple[Chunk, list[Request]]:
        """This step's prefill chunk over the admitted requests' pending rows, and each row's owner."""
        pending: list[PrefillRow] = []
        owner: dict[int, Request] = {}
        for r in running:
            for row in r.prefill:
                if not row.finished and row.ready:
                    pending.append(row)
                    owner[id(row)] = r
        chunk = plan_chunk(pending, self.limits.max_prefill_tokens)
        return chunk, [owner[id(row)] for row in chunk.rows]
