"""The gRPC server: RagService + health + reflection, graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

import ragmix
from ragmix.config import ServerConfig
from ragmix.engine.engine import Engine
from ragmix.engine.loader import load_engine
from ragmix.service.access_log import ObservingInterceptor, configure_logs
from ragmix.service.admin import IndexAdminServicer
from ragmix.service.errors import ErrorInterceptor
from ragmix.service.prometheus import PrometheusObserver, RpcMetrics, serve_metrics
from ragmix.service.security import AuthInterceptor, load_tokens, server_credentials
from ragmix.service.servicer import RagServicer
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

LOG = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RagService"].full_name  # "ragmix.v1.RagService"
ADMIN_NAME = pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name  # "ragmix.v1.IndexAdmin"
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
        index_type=idx.index_type,
        device=engine.device,
        index_device=idx.searches_on,
        generator_architecture="encoder-decoder" if g.is_encoder_decoder else "decoder-only",
        passage_cache=engine.passage_cache is not None,
        passages=idx.passages,
        max_top_k=lim.max_top_k,
        max_new_tokens=lim.max_new_tokens,
        max_query_chars=lim.max_query_chars,
        default_top_k=lim.default_top_k,
        default_max_new_tokens=lim.default_max_new_tokens,
        providers=list(g.providers),
        max_concurrent_requests=engine.config.max_concurrent_requests,
        max_queued_requests=engine.config.max_queued_requests,
    )


async def serve(
    config: ServerConfig, step_gate: Callable[[Sequence[object]], None] | None = None
) -> None:
    """Load the bundles, serve until SIGTERM/SIGINT, then drain and exit.

    step_gate, when given, is called on the engine thread before every step (tests hold streams
    open with it).
    """
    configure_logs(config.log_format)
    # Credentials, tokens and the metrics port are checked before the slow model load.
    credentials = server_credentials(config)
    tokens = load_tokens(config.auth_token_file) if config.auth_token_file else None
    admin_tokens = (
        load_tokens(config.admin_token_file, "admin_token_file")
        if config.admin_token_file
        else None
    )
    if admin_tokens and tokens and set(admin_tokens) & set(tokens):
        LOG.warning("a token is in both --auth-token-file and --admin-token-file: it can do both")
    if (
        (tokens or admin_tokens)
        and credentials is None
        and config.host not in ("127.0.0.1", "localhost", "::1")
    ):
        LOG.warning("bearer tokens travel in clear text: serving on %s without TLS", config.host)
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    rpc_metrics = RpcMetrics(registry)
    metrics_server = (
        serve_metrics(registry, config.host, config.metrics_port) if config.metrics_port else None
    )

    engine = await asyncio.to_thread(load_engine, config, observer, step_gate)
    engine.start()

    observing = ObservingInterceptor(SERVICE_NAME, rpc_metrics, also=(ADMIN_NAME,))
    # Order: request id and final status around everything; auth refuses before the servicer
    # (always installed: IndexAdmin is refused even on a server without any token).
    interceptors: list[grpc.aio.ServerInterceptor] = [
        observing,
        AuthInterceptor(tokens, admin_tokens),
        ErrorInterceptor(),
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_RagServiceServicer_to_server(RagServicer(engine, info_for(engine, config)), server)
    index = engine.retrieval.retriever.index
    pb_grpc.add_IndexAdminServicer_to_server(
        IndexAdminServicer(engine.admin, index.name, index.index_type), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Tests and scripts read this line to find the port when --port 0 picked one.
    print(f"ragmix serving on {config.host}:{port}", flush=True)
    LOG.info(
        "serving %s on %s:%d (%s%s%s%s)",
        SERVICE_NAME,
        config.host,
        port,
        "plaintext" if credentials is None else "TLS",
        ", client certificates required" if config.tls_client_ca else "",
        f", {len(tokens)} bearer token(s)" if tokens else "",
        f", IndexAdmin with {len(admin_tokens)} admin token(s)" if admin_tokens else "",
    )
    if metrics_server is not None:
        LOG.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)

    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()  # a second signal skips the rest of the drain

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await stop.wait()
    finally:
        LOG.info("shutting down: draining for up to %.0f s", config.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        engine.stop_admitting()
        # While streams finish the server still answers: health says NOT_SERVING and new
        # requests get UNAVAILABLE with a message, rather than a connection error.
        deadline = loop.time() + config.grace_seconds
        while observing.in_flight > 0 and loop.time() < deadline and not force.is_set():
            await asyncio.sleep(0.05)
        if observing.in_flight:
            LOG.warning("grace period over: cancelling %d RPCs", observing.in_flight)
        # RPCs still running after the grace are cancelled (which frees their rows).
        await server.stop(0 if force.is_set() else max(deadline - loop.time(), 0.0))
        await asyncio.to_thread(engine.shutdown)
        if metrics_server is not None:
            metrics_server.shutdown()
        LOG.info("stopped")
