"""The access log: request ids, one log line per RPC, and JSON log lines.

ObservingInterceptor, outermost, gives every RPC a request id (the caller's "x-request-id" when it
is a sane token, else a fresh one), echoes it back as trailing metadata "x-request-id" so a
client's report can be matched to a log line, tags the RPC's log records with it, and when the RPC
ends logs one line with its final status code and counts it in the Prometheus RPC metrics.
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

from ragmix.service.interceptor import guarded
from ragmix.service.prometheus import RpcMetrics

ACCESS_LOG = logging.getLogger("ragmix.access")

REQUEST_ID_KEY = "x-request-id"
# The id of the RPC being served in this asyncio task ("" outside one); log records carry it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_GOOD_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


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


# A client's deadline travels as a remaining duration that the server counts from when it reads
# it, so the server's copy ends a little later than the client's: the client's own deadline fires
# first and arrives as a cancel. A cancel this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.25


def _final_code(
    err: BaseException | None, context: grpc.aio.ServicerContext, deadline: float | None
) -> grpc.StatusCode:
    # grpc.aio ends a handler whose client went away by cancelling its task, or, for a response
    # stream, by closing the generator (GeneratorExit): both mean cancelled or deadline passed.
    if isinstance(err, asyncio.CancelledError | GeneratorExit):
        # The server cancels the handler when the client cancels or its deadline passes. The call
        # object may already be gone then: touching the context here crashed the process (seen
        # with grpcio 1.85), so the deadline was read when the RPC began.
        if deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S:
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

    def __init__(
        self, service: str, metrics: RpcMetrics | None, also: tuple[str, ...] = ()
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.counted = tuple(f"/{s}/" for s in (service, *also))  # logged at INFO, drained
        self.in_flight = 0  # RagService (and `also`) RPCs running now; health, reflection excluded

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; no label for junk names
            return None
        rpc = _rpc_name(details.method, self.service)
        ours = details.method.startswith(self.counted)
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


class _PeerGoneFilter(logging.Filter):
    """grpc.aio logs a response write that core refuses, which happens when the call already
    ended (the client cancelled, its deadline passed), as ERROR with a traceback
    ("ExecuteBatchError raised in core by servicer method", grpc/grpc#32551). Nothing failed on
    the server's side and the access log records the call's status, so it becomes DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "ExecuteBatchError raised" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def configure_logs(log_format: str) -> None:
    """Tag records with the request id; with 'json', every handler writes JSON lines."""
    logging.getLogger("grpc._cython.cygrpc").addFilter(_PeerGoneFilter())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RequestIdFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
