"""guarded(): every call shape runs inside the guard, which sees the servicer's exit."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from ragmix.service.interceptor import guarded


def _recording_guard(seen: list):
    @contextlib.asynccontextmanager
    async def guard(context):
        seen.append(("enter", context))
        try:
            yield
        except BaseException as e:
            seen.append(("error", type(e)))
            raise
        seen.append(("exit", context))

    return guard


def _handler(kind: str, behaviour):
    make = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
    }[kind]
    return make(behaviour, request_deserializer=bytes, response_serializer=bytes)


def test_unary_unary_keeps_serializers_and_returns_the_answer():
    async def echo(request, context):
        return request + b"!"

    seen: list = []
    wrapped = guarded(_handler("unary_unary", echo), _recording_guard(seen))
    assert wrapped.request_deserializer is bytes and wrapped.response_serializer is bytes
    assert asyncio.run(wrapped.unary_unary(b"hi", "ctx")) == b"hi!"
    assert seen == [("enter", "ctx"), ("exit", "ctx")]


def test_unary_unary_exception_passes_through_the_guard():
    async def broken(request, context):
        raise KeyError("x")

    seen: list = []
    wrapped = guarded(_handler("unary_unary", broken), _recording_guard(seen))
    with pytest.raises(KeyError):
        asyncio.run(wrapped.unary_unary(b"", "ctx"))
    assert seen == [("enter", "ctx"), ("error", KeyError)]


def test_response_stream_stays_a_generator_and_its_close_reaches_the_guard():
    async def count(request, context):
        for i in range(3):
            yield bytes([i])

    async def take_one(wrapped):
        stream = wrapped.unary_stream(b"", "ctx")
        first = await anext(stream)
        await stream.aclose()  # what grpc.aio does when the client goes away
        return first

    seen: list = []
    wrapped = guarded(_handler("unary_stream", count), _recording_guard(seen))
    assert asyncio.run(take_one(wrapped)) == b"\x00"
    assert seen == [("enter", "ctx"), ("error", GeneratorExit)]

    async def all_of(wrapped):
        return [r async for r in wrapped.unary_stream(b"", "ctx")]

    seen.clear()
    assert asyncio.run(all_of(wrapped)) == [b"\x00", b"\x01", b"\x02"]
    assert seen == [("enter", "ctx"), ("exit", "ctx")]


def test_writer_stream_stays_a_coroutine():
    async def watch(request, context):  # health's Watch writes with context.write
        context.append(b"w")

    seen: list = []
    wrapped = guarded(_handler("unary_stream", watch), _recording_guard(seen))
    written: list = []
    assert asyncio.iscoroutinefunction(wrapped.unary_stream)
    asyncio.run(wrapped.unary_stream(b"", written))
    assert written == [b"w"]
    assert seen == [("enter", written), ("exit", written)]


def test_a_guard_that_raises_on_entry_keeps_the_servicer_from_running():
    ran: list = []

    async def servicer(request, context):
        ran.append(True)
        yield b""

    @contextlib.asynccontextmanager
    async def refuse(context):
        raise PermissionError("no")
        yield  # pragma: no cover

    async def drain(wrapped):
        return [r async for r in wrapped.unary_stream(b"", "ctx")]

    wrapped = guarded(_handler("unary_stream", servicer), refuse)
    with pytest.raises(PermissionError):
        asyncio.run(drain(wrapped))
    assert ran == []


def test_unknown_methods_and_streaming_requests_pass_through():
    async def upload(requests, context):
        return b""

    handler = _handler("stream_unary", upload)
    assert guarded(handler, _recording_guard([])) is handler
    assert guarded(None, _recording_guard([])) is None
