"""ragmix.v1.IndexAdmin: each RPC is from_pb -> one engine.admin call -> to_pb.

The admin token is checked before any of these run (service/security.py).
"""

from __future__ import annotations

import grpc

from ragmix.engine.admin import IndexAdmin
from ragmix.index.store import Passage
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc


class IndexAdminServicer(pb_grpc.IndexAdminServicer):
    def __init__(self, admin: IndexAdmin, index_name: str, index_type: str) -> None:
        self.admin = admin
        self.index_name = index_name
        self.index_type = index_type

    async def AddPassages(
        self, request: pb.AddPassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddPassagesResponse:
        added = await self.admin.add(
            [Passage(p.id, p.title, p.text, p.source) for p in request.passages]
        )
        return pb.AddPassagesResponse(
            ids=added.ids, passages=added.passages, sequence=added.sequence
        )

    async def DeletePassages(
        self, request: pb.DeletePassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePassagesResponse:
        result = await self.admin.delete(list(request.ids))
        return pb.DeletePassagesResponse(
            deleted=result.deleted,
            not_found=result.not_found,
            passages=result.passages,
            sequence=result.sequence,
        )

    async def IndexStats(
        self, request: pb.IndexStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IndexStatsResponse:
        c = await self.admin.stats()
        return pb.IndexStatsResponse(
            index=self.index_name,
            index_type=self.index_type,
            passages=c.passages,
            vectors=c.vectors,
            built=c.built,
            added=c.added,
            deleted=c.deleted,
            sequence=c.sequence,
            snapshot_sequence=c.snapshot_sequence,
            writable=c.writable,
            max_batch_passages=self.admin.limits.max_batch,
            max_text_chars=self.admin.limits.max_text_chars,
        )
