"""The gRPC ingress of the Ray Serve application: ragmix.v1.RagService and grpc.health.v1.Health
as Ray's gRPC proxy delivers them (a method per RPC, named as in the .proto).

Thin on purpose: the bearer-token check and the error mapping of the single-node server, then one
call to a replica. A replica's RagmixError keeps its status and message; a replica that died or
is restarting is UNAVAILABLE (the SDK retries a Generate that has not streamed yet), a full
deployment queue RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from ragmix.service.errors import status_for
from ragmix.service.security import load_tokens, serving_refusal
from ragmix_client.proto import ragmix_pb2 as pb

LOG = logging.getLogger(__name__)
SERVICE_NAME = "ragmix.v1.RagService"

_UNAVAILABLE = (
    ray_errors.ActorDiedError,
    ray_errors.ActorUnavailableError,
    ray_errors.RayActorError,
    serve_errors.DeploymentUnavailableError,
)


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status the single-node server would give, for an error that crossed from a replica."""
    if isinstance(err, serve_errors.BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, (
            "every replica's queue is full; retry with backoff, or add replicas."
        )
    if isinstance(err, _UNAVAILABLE):
        return grpc.StatusCode.UNAVAILABLE, (
            "the replica serving this request stopped (Ray restarts it); retry."
        )
    if isinstance(err, ray_errors.RayTaskError):  # the replica raised: map what it raised
        cause = err.cause
        return status_of(cause) if cause is not None else status_for(err)
    return status_for(err)


class StreamFailed(Exception):
    """Raised by a streaming method after it set the status on its context: Ray's proxy takes a
    server-streaming call's status from an exception (then it keeps the one the context holds);
    a stream that ends normally is OK, whatever the context says."""


class RagIngress:
    """Routes each RPC to a RagReplica through a DeploymentHandle."""

    def __init__(self, replicas: DeploymentHandle, auth_token_file: str | None = None) -> None:
        self.replicas = replicas
        self.tokens = load_tokens(auth_token_file) if auth_token_file else None

    def _refused(self, context: RayServegRPCContext) -> bool:
        refusal = serving_refusal(self.tokens, context.invocation_metadata())
        if refusal is not None:
            context.set_code(refusal[0])
            context.set_details(refusal[1])
        return refusal is not None

    @staticmethod
    def _fail(context: RayServegRPCContext, err: BaseException) -> None:
        code, message = status_of(err)
        context.set_code(code)
        context.set_details(message)

    async def _unary(self, method: str, request: Any, empty: Any, context: RayServegRPCContext):
        if self._refused(context):
            return empty
        try:
            return await getattr(self.replicas, method).remote(request)
        except Exception as e:
            self._fail(context, e)
            return empty

    async def Generate(  # the RPC's name: Ray's proxy calls the method so named
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self._refused(grpc_context):
            raise StreamFailed(grpc_context.details())
        stream = self.replicas.options(stream=True).generate.remote(request)
        try:
            async for response in stream:
                yield response
        except Exception as e:
            self._fail(grpc_context, e)
            raise StreamFailed(grpc_context.details()) from None

    async def Score(
        self, request: pb.ScoreRequest, grpc_context: RayServegRPCContext
    ) -> pb.ScoreResponse:
        return await self._unary("score", request, pb.ScoreResponse(), grpc_context)

    async def Retrieve(
        self, request: pb.RetrieveRequest, grpc_context: RayServegRPCContext
    ) -> pb.RetrieveResponse:
        return await self._unary("retrieve", request, pb.RetrieveResponse(), grpc_context)

    async def GetInfo(
        self, request: pb.GetInfoRequest, grpc_context: RayServegRPCContext
    ) -> pb.GetInfoResponse:
        return await self._unary("get_info", request, pb.GetInfoResponse(), grpc_context)

    async def Check(  # grpc.health.v1.Health/Check
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        """SERVING when a replica answers; the same service names as the single-node server."""
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        try:
            await self.replicas.get_info.remote(pb.GetInfoRequest())
        except Exception as e:
            LOG.info("health check: no replica answered (%s)", type(e).__name__)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(  # grpc.health.v1.Health/Watch
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        grpc_context.set_details("on a Ray Serve cluster use Health/Check (Ray's proxy routes it)")
        raise StreamFailed(grpc_context.details())
        yield  # an async generator: Watch is server-streaming
