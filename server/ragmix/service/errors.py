"""One place maps domain exceptions to gRPC status codes (TGI-style interceptor).

Servicers raise; this interceptor turns a RagmixError into its status with the error's message.
Anything else is a bug: it is logged with a traceback and reported as INTERNAL with an id to grep.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ragmix.errors import (
    BundleError,
    NotFoundError,
    OverloadedError,
    RagmixError,
    UnavailableError,
    ValidationError,
)

LOG = logging.getLogger(__name__)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
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


def rebuild(
    handler: grpc.RpcMethodHandler,
    *,
    unary_unary: Callable[..., Any] | None = None,
    unary_stream: Callable[..., Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s (de)serializers and a new behaviour; interceptors wrap with it."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, e)

            return rebuild(handler, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream
            if inspect.iscoroutinefunction(inner_us):  # writes with context.write (health Watch)

                async def unary_stream_writer(
                    request: Any, context: grpc.aio.ServicerContext
                ) -> None:
                    try:
                        await inner_us(request, context)
                    except grpc.aio.AbortError:
                        raise
                    except Exception as e:
                        await _abort(context, e)

                return rebuild(handler, unary_stream=unary_stream_writer)

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator:
                try:
                    async for response in inner_us(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, e)

            return rebuild(handler, unary_stream=unary_stream)
        return handler
