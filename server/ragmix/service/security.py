"""TLS / mutual TLS credentials and bearer-token auth.

Health and reflection stay open so load balancers and grpcurl work without a token; every
RagService RPC needs "authorization: Bearer <token>" when a token file is configured.
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


def load_tokens(path: str) -> list[bytes]:
    """Tokens, one per line; blank lines and '#' comments skipped. Several allow rotation."""
    text = _read("auth_token_file", path).decode("utf-8", errors="replace")
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValidationError("auth_token_file", f"auth_token_file: {path} holds no token.")
    bad = [i for i, t in enumerate(tokens) if any(c.isspace() for c in t)]
    if bad:
        raise ValidationError(
            "auth_token_file",
            f"auth_token_file: token {bad[0] + 1} in {path} contains whitespace; "
            "write one token per line.",
        )
    return [t.encode() for t in tokens]


def token_accepted(given: bytes, tokens: list[bytes]) -> bool:
    """Compares against every token in constant time, so timing reveals neither which nor how
    much of a token matched."""
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given, t)
    return ok


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RagService RPCs without an accepted bearer token, with UNAUTHENTICATED, before the
    servicer runs."""

    def __init__(self, tokens: list[bytes]) -> None:
        self.tokens = tokens

    def _refusal(self, metadata: Any) -> str | None:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return (
                "this server needs a bearer token: send metadata 'authorization: Bearer <token>' "
                "(ragmix ask --token, or RAGMIX_TOKEN)."
            )
        scheme, _, token = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization metadata must read 'Bearer <token>'."
        if not token_accepted(token.strip().encode(), self.tokens):
            return "the bearer token was not accepted; check it against the server's token file."
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        message = self._refusal(details.invocation_metadata)
        if message is None:
            return handler

        @contextlib.asynccontextmanager
        async def refuse(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises: the servicer never runs

        # Streaming requests pass through unchecked: RagService has none.
        return guarded(handler, refuse)
