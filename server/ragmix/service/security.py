"""TLS / mutual TLS credentials and bearer-token auth.

Health and reflection stay open so load balancers and grpcurl work without a token; every
RagService RPC needs "authorization: Bearer <token>" when a token file is configured, and every
IndexAdmin RPC always needs an admin token (--admin-token-file).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from ragmix.config import ServerConfig
from ragmix.errors import ValidationError
from ragmix.service.interceptor import guarded

LOG = logging.getLogger(__name__)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValidationError(name, f"{name}: cannot read {path}: {e.strerror or e}.") from e


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key; with --tls-client-ca, clients must present a
    certificate that CA signed (mutual TLS). None: plaintext."""
    if not config.tls_cert:
        return None
    cert = _read("tls_cert", config.tls_cert)
    key = _read("tls_key", config.tls_key or "")
    for name, data, marker in (
        ("tls_cert", cert, b"-----BEGIN CERTIFICATE-----"),
        ("tls_key", key, b"PRIVATE KEY-----"),
    ):
        if marker not in data:
            raise ValidationError(name, f"{name}: {getattr(config, name)} is not a PEM file.")
    ca = _read("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    if ca is not None and b"-----BEGIN CERTIFICATE-----" not in ca:
        raise ValidationError(
            "tls_client_ca", f"tls_client_ca: {config.tls_client_ca} is not a PEM file."
        )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def load_tokens(path: str, name: str = "auth_token_file") -> list[bytes]:
    """Tokens, one per line; blank lines and '#' comments skipped. Several allow rotation."""
    text = _read(name, path).decode("utf-8", errors="replace")
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValidationError(name, f"{name}: {path} holds no token.")
    bad = [i for i, t in enumerate(tokens) if any(c.isspace() for c in t)]
    if bad:
        raise ValidationError(
            name,
            f"{name}: token {bad[0] + 1} in {path} contains whitespace; write one token per line.",
        )
    return [t.encode() for t in tokens]


def token_accepted(given: bytes, tokens: list[bytes]) -> bool:
    """Compares against every token in constant time, so timing reveals neither which nor how
    much of a token matched."""
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given, t)
    return ok


ADMIN_SERVICE = "/ragmix.v1.IndexAdmin/"


def _bearer(metadata: Any) -> tuple[bytes | None, str | None]:
    """(token, None), or (None, why the authorization metadata is missing or malformed)."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        return None, "send metadata 'authorization: Bearer <token>'"
    scheme, _, token = str(values[0]).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "the authorization metadata must read 'Bearer <token>'"
    return token.strip().encode(), None


Refusal = tuple[grpc.StatusCode, str] | None


def serving_refusal(tokens: list[bytes] | None, metadata: Any) -> Refusal:
    """Why a RagService call may not run (None: it may); `tokens` None = serving auth off."""
    if tokens is None:
        return None
    token, problem = _bearer(metadata)
    if token is None:
        return UNAUTHENTICATED, (
            f"this server needs a bearer token: {problem} (ragmix ask --token, or RAGMIX_TOKEN)."
        )
    if not token_accepted(token, tokens):
        return UNAUTHENTICATED, (
            "the bearer token was not accepted; check it against the server's token file."
        )
    return None


def admin_refusal(admin: list[bytes] | None, serving: list[bytes] | None, metadata: Any) -> Refusal:
    """Why an IndexAdmin call may not run: it always needs an admin token."""
    if admin is None:
        return PERMISSION_DENIED, (
            "this server does not accept index changes: start it with --admin-token-file."
        )
    token, problem = _bearer(metadata)
    if token is None:
        return UNAUTHENTICATED, f"IndexAdmin needs the admin token: {problem}."
    if token_accepted(token, admin):
        return None
    if serving and token_accepted(token, serving):
        return PERMISSION_DENIED, (
            "this token may use RagService but not IndexAdmin; send an admin token "
            "(the server's --admin-token-file)."
        )
    return UNAUTHENTICATED, (
        "the admin token was not accepted; check it against the server's admin token file."
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token before the servicer runs.

    RagService needs a serving token when a token file is configured (`serving`; None = open).
    IndexAdmin always needs an admin token: on a server without admin tokens it is refused with
    PERMISSION_DENIED, a missing or unknown token is UNAUTHENTICATED, and a serving token (known,
    but not allowed to change the index) is PERMISSION_DENIED. Health and reflection stay open.
    """

    def __init__(self, serving: list[bytes] | None, admin: list[bytes] | None = None) -> None:
        self.serving = serving
        self.admin = admin

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = details.invocation_metadata
        if details.method.startswith(ADMIN_SERVICE):
            refusal = admin_refusal(self.admin, self.serving, metadata)
        else:
            refusal = serving_refusal(self.serving, metadata)
        if refusal is None:
            return handler
        code, message = refusal

        @contextlib.asynccontextmanager
        async def refuse(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises: the servicer never runs

        # Streaming requests pass through unchecked: neither service has them.
        return guarded(handler, refuse)
