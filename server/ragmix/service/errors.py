"""One place maps domain exceptions to gRPC status codes (TGI-style interceptor).

Servicers raise; this interceptor turns a RagmixError into its status with the error's message.
Anything else is a bug: it is logged with a traceback and reported as INTERNAL with an id to grep.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from ragmix.errors import (
    BundleError,
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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return guarded(await continuation(details), _mapped)
