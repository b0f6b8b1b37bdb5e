"""One ragmix engine (generator, encoder, index) as a Ray Serve replica.

Its methods take and return ragmix.v1 protobuf messages (they pickle), so the ingress only routes;
the translation is the single-node servicer's own (service/servicer.py), called without a gRPC
context.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ragmix.config import ServerConfig
from ragmix.engine.loader import load_engine
from ragmix.service.server import info_for
from ragmix.service.servicer import RagServicer
from ragmix_client.proto import ragmix_pb2 as pb


class RagReplica:
    """Loads the bundles named in `settings` (ServerConfig fields; none: the embedded defaults)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.config = ServerConfig(**settings).validate()
        self.engine = load_engine(self.config)
        self.engine.start()
        replica = serve.get_replica_context().replica_id.unique_id
        self.replica = f"{replica}@{socket.gethostname()}:{os.getpid()}"
        info = info_for(self.engine, self.config)
        info.replica = self.replica
        self.servicer = RagServicer(self.engine, info)

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        async for response in self.servicer.Generate(request, None):
            yield response

    async def score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        return await self.servicer.Score(request, None)

    async def retrieve(self, request: pb.RetrieveRequest) -> pb.RetrieveResponse:
        return await self.servicer.Retrieve(request, None)

    async def get_info(self, request: pb.GetInfoRequest) -> pb.GetInfoResponse:
        return await self.servicer.GetInfo(request, None)

    def check_health(self) -> None:
        """Ray restarts a replica whose engine thread died."""
        if not self.engine.core._thread.is_alive():
            raise RuntimeError(f"replica {self.replica}: the engine thread is not running")

    def __del__(self) -> None:
        """On scale-down or redeploy: requests still in flight end with UNAVAILABLE."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
