"""Observability: Prometheus metrics, one log line per RPC, and request ids.

The engine reports through EngineObserver hooks (it never imports prometheus or grpc); the RPC
interceptor here counts every RPC's final status code, logs it with its request id and echoes the
id back as trailing metadata "x-request-id", so a client's report can be matched to a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ragmix.engine.observer import EngineObserver
from ragmix.service.interceptor import guarded

LOG = logging.getLogger(__name__)
ACCESS_LOG = logging.getLogger("ragmix.access")

REQUEST_ID_KEY = "x-request-id"
# The id of the RPC being served in this asyncio task ("" outside one); log records carry it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_GOOD_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class PrometheusObserver(EngineObserver):
    """The engine's hooks, recorded on `registry` (its own, so tests and processes never share)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queue_depth = Gauge(
            "ragmix_queue_depth", "Requests waiting for admission.", registry=r
        )
        self.running_requests = Gauge(
            "ragmix_running_requests", "Requests in the running batch.", registry=r
        )
        self.active_rows = Gauge(
            "ragmix_active_rows", "Passage rows in the running batch.", registry=r
        )
        self.batch_rows = Histogram(
            "ragmix_batch_rows", "Rows in one engine step.", buckets=_ROW_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "ragmix_step_seconds",
            "Time of one engine step (generator pass + mixture kernel).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "ragmix_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "ragmix_inter_token_latency_seconds",
            "Between two consecutive tokens of one request.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.retrieval_seconds = Histogram(
            "ragmix_retrieval_seconds",
            "One batched retrieval (encode + search).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.retrieval_batch = Histogram(
            "ragmix_retrieval_batch_queries",
            "Queries embedded and searched together.",
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "ragmix_prefill_seconds",
            "One prefill of new prompts.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.prefill_tokens = Counter(
            "ragmix_prefill_tokens", "Prompt tokens computed by prefill.", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "ragmix_cached_prompt_tokens",
            "Prompt tokens taken from the passage KV cache instead of computed.",
            registry=r,
        )
        self.passage_cache_hits = Counter(
            "ragmix_passage_cache_hits", "Passage KV cache lookups that hit.", registry=r
        )
        self.passage_cache_misses = Counter(
            "ragmix_passage_cache_misses", "Passage KV cache lookups that missed.", registry=r
        )
        self.passage_cache_bytes = Gauge(
            "ragmix_passage_cache_bytes", "Bytes held by the passage KV cache.", registry=r
        )
        self.passage_cache_entries = Gauge(
            "ragmix_passage_cache_entries", "Passages held by the passage KV cache.", registry=r
        )
        self.generated_tokens = Counter(
            "ragmix_generated_tokens", "Tokens generated, all requests.", registry=r
        )
        self.finished = Counter(
            "ragmix_finished_requests",
            "Requests that left the engine, by finish reason.",
            ["reason"],
            registry=r,
        )

    def on_step(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.step_seconds.observe(seconds)

    def on_queue(self, waiting: int, running: int, rows: int) -> None:
        self.queue_depth.set(waiting)
        self.running_requests.set(running)
        self.active_rows.set(rows)

    def on_prefill(self, rows: int, tokens: int, cached_tokens: int, seconds: float) -> None:
        self.prefill_tokens.inc(tokens)
        self.cached_prompt_tokens.inc(cached_tokens)
        self.prefill_seconds.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def on_retrieval(self, batch: int, seconds: float) -> None:
        self.retrieval_batch.observe(batch)
        self.retrieval_seconds.observe(seconds)

    def on_passage_cache(self, hits: int, misses: int, bytes_used: int, entries: int) -> None:
        self.passage_cache_hits.inc(hits)
        self.passage_cache_misses.inc(misses)
        self.passage_cache_bytes.set(bytes_used)
        self.passage_cache_entries.set(entries)

    def on_finish(self, reason: str, generated_tokens: int) -> None:
        self.finished.labels(reason).inc()
        self.generated_tokens.inc(generated_tokens)


class RpcMetrics:
    """Per-RPC counters, and the count of RagService RPCs in flight (the drain waits on it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ragmix_requests",
            "Finished RPCs by method and final gRPC status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "ragmix_request_seconds",
            "RPC duration by method (a Generate: its whole stream).",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "ragmix_in_flight_rpcs", "RagService RPCs being served.", registry=registry
        )
        self.in_flight_count = 0  # the gauge's value, readable without a scrape


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the server (to shut down)."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from e
    return server


# ------------------------------------------------------------------------------------ RPCs


def _request_id(metadata: Any) -> str:
    """The caller's x-request-id when it is a sane token, else a fresh one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _GOOD_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _rpc_name(method: str, service: str) -> str:
    """'/ragmix.v1.RagService/Generate' -> 'Generate'; other services keep 'Service/Method'."""
    svc, _, name = method.lstrip("/").rpartition("/")
    return name if svc == service else f"{svc}/{name}"


def _final_code(
    err: BaseException | None, context: grpc.aio.ServicerContext, deadline: float | None
) -> grpc.StatusCode:
    # grpc.aio ends a handler whose client went away by cancelling its task, or, for a response
    # stream, by closing the generator (GeneratorExit): both mean cancelled or deadline passed.
    if isinstance(err, asyncio.CancelledError | GeneratorExit):
        # The server cancels the handler when the client cancels or its deadline passes. The call
        # object may already be gone then: touching the context here crashed the process (seen
        # with grpcio 1.85), so the deadline was read when the RPC began.
        if deadline is not None and time.monotonic() >= deadline:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if err is not None and not isinstance(err, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Outermost: request id in and out, the final status counted, one log line per RPC."""

    def __init__(self, service: str, metrics: RpcMetrics | None) -> None:
        self.service = service
        self.metrics = metrics
        self.in_flight = 0  # RagService RPCs running now; health and reflection streams excluded

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; no label for junk names
            return None
        rpc = _rpc_name(details.method, self.service)
        ours = details.method.startswith(f"/{self.service}/")
        rid = _request_id(details.invocation_metadata)

        def begin(context: grpc.aio.ServicerContext) -> tuple[float, str, float | None]:
            """Start time, peer and deadline, read while the call is certainly alive."""
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            REQUEST_ID.set(rid)
            if ours:
                self.in_flight += 1
                if self.metrics is not None:
                    self.metrics.in_flight.inc()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            return time.perf_counter(), context.peer(), deadline

        def end(
            start: tuple[float, str, float | None],
            err: BaseException | None,
            context: grpc.aio.ServicerContext,
        ) -> None:
            t0, peer, deadline = start
            seconds = time.perf_counter() - t0
            code = _final_code(err, context, deadline).name
            if ours:
                self.in_flight -= 1
            if self.metrics is not None:
                if ours:
                    self.metrics.in_flight.dec()
                self.metrics.requests.labels(rpc, code).inc()
                self.metrics.seconds.labels(rpc).observe(seconds)
            fields = {
                "request_id": rid,
                "rpc": rpc,
                "code": code,
                "ms": round(seconds * 1e3, 1),
                "peer": peer,
            }
            ACCESS_LOG.log(
                logging.INFO if ours else logging.DEBUG,
                "%s",
                " ".join(f"{k}={v}" for k, v in fields.items()),
                extra={"fields": fields},
            )

        @contextlib.asynccontextmanager
        async def observed(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            start, err = begin(context), None
            try:
                yield
            except BaseException as e:
                err = e
                raise
            finally:
                end(start, err, context)

        return guarded(handler, observed)


# ------------------------------------------------------------------------------------ logs


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and the RPC fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        if hasattr(record, "fields"):  # the per-RPC line: its fields say it all
            out["msg"] = "rpc finished"
            out.update(record.fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logs(log_format: str) -> None:
    """Tag records with the request id; with 'json', every handler writes JSON lines."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RequestIdFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
