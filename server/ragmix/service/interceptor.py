"""The grpc.aio interceptor plumbing, written once.

An interceptor here says what happens around one call as an async context manager made from the
call's context (`Guard`); `guarded` rebuilds a method handler so that every call runs inside it:
set-up before the servicer, the servicer's exception (or the close of its response stream) seen on
the way out. Raising in `__aenter__` (an abort) refuses the call before the servicer runs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

# What one interceptor does around one call, made from that call's context.
Guard = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


def _rebuild(
    handler: grpc.RpcMethodHandler,
    *,
    unary_unary: Callable[..., Any] | None = None,
    unary_stream: Callable[..., Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s (de)serializers and a new behaviour."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)


def guarded(handler: grpc.RpcMethodHandler | None, guard: Guard) -> grpc.RpcMethodHandler | None:
    """`handler` with each call run inside `guard(context)`.

    Unary-unary and unary-stream handlers are wrapped; a response stream keeps its shape (an async
    generator stays one, and so is closed with GeneratorExit when grpc.aio ends it; a coroutine
    that writes with context.write, like health's Watch, stays a coroutine). Streaming requests
    (only reflection has them) and unknown methods (None) pass through untouched.
    """
    if handler is None:
        return None
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context):
                return await inner_uu(request, context)

        return _rebuild(handler, unary_unary=unary_unary)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream
        if inspect.iscoroutinefunction(inner_us):

            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with guard(context):
                    await inner_us(request, context)

            return _rebuild(handler, unary_stream=unary_stream_writer)

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            async with guard(context):
                async for response in inner_us(request, context):
                    yield response

        return _rebuild(handler, unary_stream=unary_stream)
    return handler
