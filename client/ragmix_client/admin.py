"""Synchronous client of ragmix.v1.IndexAdmin: add and delete passages on a running server.

    from ragmix_client import IndexAdminClient, NewPassage

    with IndexAdminClient("127.0.0.1:50051", token=ADMIN_TOKEN) as admin:
        added = admin.add_passages([NewPassage("Walrus", "Assignment expressions ...")])
        admin.delete_passages(added.ids)

It is a RagClient too (retrieve, generate, ...), with the admin token on every call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ragmix_client.client import RagClient
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc
from ragmix_client.types import AddResult, DeleteResult, IndexStats, NewPassage


class IndexAdminClient(RagClient):
    """A channel to one ragmix server with its admin token (`token=`); see RagClient and
    ClientBase for the connection arguments."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._admin = pb_grpc.IndexAdminStub(self._channel)

    def add_passages(
        self, passages: Sequence[NewPassage], *, timeout: float | None = None
    ) -> AddResult:
        """Embed and add passages (at most IndexStats.max_batch_passages), all or none; durable
        when this returns. Not retried: a retry after a lost reply would add them twice (or, with
        ids, fail with ALREADY_EXISTS)."""
        request = pb.AddPassagesRequest(passages=[p.to_pb() for p in passages])
        resp = self._once(self._admin.AddPassages, request, timeout)
        return AddResult(list(resp.ids), resp.passages, resp.sequence)

    def delete_passages(self, ids: Sequence[str], *, timeout: float | None = None) -> DeleteResult:
        """Delete passages by id; ids the index does not hold come back in `not_found`, so this
        is safe to repeat (and is retried on UNAVAILABLE)."""
        request = pb.DeletePassagesRequest(ids=list(ids))
        resp = self._unary(self._admin.DeletePassages, request, timeout)
        return DeleteResult(list(resp.deleted), list(resp.not_found), resp.passages, resp.sequence)

    def stats(self, *, timeout: float | None = None) -> IndexStats:
        resp = self._unary(self._admin.IndexStats, pb.IndexStatsRequest(), timeout)
        return IndexStats.from_pb(resp)

    def add_all(
        self, passages: Iterable[NewPassage], *, batch: int = 0, timeout: float | None = None
    ) -> Iterator[AddResult]:
        """add_passages over any number of passages, `batch` at a time (0: the server's
        limit), yielding each batch's result as it is acknowledged."""
        size = batch or self.stats(timeout=timeout).max_batch_passages
        chunk: list[NewPassage] = []
        for p in passages:
            chunk.append(p)
            if len(chunk) == size:
                yield self.add_passages(chunk, timeout=timeout)
                chunk = []
        if chunk:
            yield self.add_passages(chunk, timeout=timeout)
