"""ragmix.v1.RagService: each RPC is from_pb -> one engine call -> to_pb."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from ragmix.engine.engine import Engine
from ragmix.service import convert
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc


class RagServicer(pb_grpc.RagServiceServicer):
    def __init__(self, engine: Engine, info: pb.GetInfoResponse) -> None:
        self.engine = engine
        self.info = info

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        events = self.engine.generate(
            convert.retrieval_from_pb(request),
            convert.decoding_from_pb(request.decoding),
            convert.mixture_from_pb(request.mixture),
        )
        try:
            async for ev in events:
                yield convert.event_to_pb(ev)
        finally:
            await events.aclose()  # on cancel or deadline: frees the request's rows

    async def Retrieve(
        self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetrieveResponse:
        passages, _ = await self.engine.retrieve(convert.retrieval_from_pb(request))
        return pb.RetrieveResponse(passages=[convert.passage_to_pb(p) for p in passages])

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        passages, result = await self.engine.score(
            convert.retrieval_from_pb(request), request.answer
        )
        return convert.score_to_pb(passages, result)

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInfoResponse:
        info = pb.GetInfoResponse()
        info.CopyFrom(self.info)
        info.passages = self.engine.retrieval.retriever.index.passages  # changes with IndexAdmin
        return info
