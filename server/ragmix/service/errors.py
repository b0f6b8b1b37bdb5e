"""One place maps domain exceptions to gRPC status codes (TGI-style interceptor).

Servicers raise; this interceptor turns a RagmixError into its status with the error's message.
Anything else is a bug: it is logged with a traceback and reported as INTERNAL with an id to grep.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ragmix.errors import (
    BundleError,
    ConflictError,
    NotFoundError,
    OverloadedError,
    RagmixError,
    UnavailableError,
    ValidationError,
)
from ragmix.service.interceptor import guarded

LOG = logging.getLogger(__name__)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(err, kind):
            return code, str(err)
    incident = uuid.uuid4().hex[:12]
    LOG.error("internal error %s", incident, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has the details."


async def _abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    code, message = status_for(err)
    if not isinstance(err, RagmixError):
        LOG.debug("aborting with %s", code)
    await context.abort(code, message)


@contextlib.asynccontextmanager
async def _mapped(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A servicer's exception becomes its status; an abort already under way passes through."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as e:
        await _abort(context, e)


class _Unparsed:
    """What a request that does not parse becomes, so the refusal happens inside the mapping."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that returns _Unparsed instead of raising: grpc.aio reports a
    deserializer's exception as UNKNOWN, before any interceptor could map it."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError, or invalid UTF-8 in a string field
            return _Unparsed(e)

    return deserialize


def _refuse_unparsed(method: str, request: Any) -> None:
    if isinstance(request, _Unparsed):
        raise ValidationError(
            "request",
            f"the request to {method} is not a valid protobuf message of its type "
            f"({request.error}); check the client's generated code and string encodings (UTF-8).",
        )


def _parsing(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    """`handler` with a tolerant deserializer and an unparsed request refused as INVALID_ARGUMENT."""
    if handler is None or handler.request_deserializer is None or handler.request_streaming:
        return handler
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _refuse_unparsed(method, request)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream is None or inspect.iscoroutinefunction(handler.unary_stream):
        return handler
    inner_us = handler.unary_stream

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
        _refuse_unparsed(method, request)
        async for response in inner_us(request, context):
            yield response

    return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return guarded(_parsing(await continuation(details), details.method), _mapped)
