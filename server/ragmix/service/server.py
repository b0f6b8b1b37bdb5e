"""The gRPC server: RagService + health + reflection, graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import ragmix
from ragmix.config import ServerConfig
from ragmix.engine.engine import Engine
from ragmix.engine.loader import load_engine
from ragmix.service.errors import ErrorInterceptor
from ragmix.service.servicer import RagServicer
from ragmix_client._proto import ragmix_pb2 as pb
from ragmix_client._proto import ragmix_pb2_grpc as pb_grpc

LOG = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RagService"].full_name  # "ragmix.v1.RagService"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def info_for(engine: Engine, config: ServerConfig) -> pb.GetInfoResponse:
    g, e, idx = (
        engine.generator,
        engine.retrieval.retriever.encoder,
        engine.retrieval.retriever.index,
    )
    lim = engine.config.limits
    return pb.GetInfoResponse(
        version=ragmix.__version__,
        generator=f"{g.name} (sha256 {g.fingerprint[:12]})",
        encoder=f"{e.name} (sha256 {e.fingerprint[:12]})",
        index=idx.name,
        passages=idx.size,
        max_top_k=lim.max_top_k,
        max_new_tokens=lim.max_new_tokens,
        max_query_chars=lim.max_query_chars,
        default_top_k=lim.default_top_k,
        default_max_new_tokens=lim.default_max_new_tokens,
        providers=list(g.providers),
        max_concurrent_requests=engine.config.max_concurrent_requests,
        max_queued_requests=engine.config.max_queued_requests,
    )


async def serve(config: ServerConfig) -> None:
    """Load the bundles, serve until SIGTERM/SIGINT, then drain and exit."""
    engine = await asyncio.to_thread(load_engine, config)
    engine.start()

    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_RagServiceServicer_to_server(RagServicer(engine, info_for(engine, config)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Tests and scripts read this line to find the port when --port 0 picked one.
    print(f"ragmix serving on {config.host}:{port}", flush=True)
    LOG.info("serving %s on %s:%d", SERVICE_NAME, config.host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        LOG.info("shutting down: draining for up to %.0f s", config.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        engine.stop_admitting()
        # Grace: in-flight RPCs may finish within it; after it they are cancelled.
        await server.stop(config.grace_seconds)
        await asyncio.to_thread(engine.shutdown)
        LOG.info("stopped")
