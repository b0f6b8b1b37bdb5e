"""What the sync and asyncio clients share: channel settings, retry policy, request builders."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ragmix_client import _health
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc
from ragmix_client.types import MIXTURES

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's own limit


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for calls that are safe to repeat.

    Only UNAVAILABLE (server not reachable / restarting) is retried, and only before any result was
    seen: unary Retrieve, GetInfo, Score and health checks, and Generate before its first event. A
    retry never outlives the call's deadline.
    """

    max_attempts: int = 4  # 1 = no retries
    initial_backoff: float = 0.1  # seconds before the second attempt
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """Seconds to wait before each retry: min(max, initial * multiplier**n), jittered by ±50%."""
        for n in range(self.max_attempts - 1):
            base = min(self.max_backoff, self.initial_backoff * self.multiplier**n)
            yield base * random.uniform(0.5, 1.5)


NO_RETRY = RetryPolicy(max_attempts=1)


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM given as bytes, or as a path to a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class Connection:
    """Channel settings turned into grpc arguments once, for either flavour of channel."""

    target: str
    credentials: grpc.ChannelCredentials | None  # None = plaintext
    options: list[tuple[str, Any]]
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def build(
        cls,
        target: str,
        *,
        tls: bool,
        root_certificates: bytes | str | Path | None,
        certificate_chain: bytes | str | Path | None,
        private_key: bytes | str | Path | None,
        token: str | None,
        keepalive_time: float | None,
        keepalive_timeout: float,
        max_message_bytes: int,
        options: Sequence[tuple[str, Any]],
        application: str | None = None,
    ) -> Connection:
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key.")
        secure = tls or root_certificates is not None or certificate_chain is not None
        credentials = (
            grpc.ssl_channel_credentials(
                _read(root_certificates), _read(private_key), _read(certificate_chain)
            )
            if secure
            else None
        )
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if keepalive_time is not None:
            # Pings on idle connections keep NATs and load balancers from dropping them silently.
            opts += [
                ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        opts += list(options)  # caller's raw options win
        metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        if application:  # Ray Serve's gRPC proxy picks the application by this key
            metadata += (("application", application),)
        return cls(target, credentials, opts, metadata)


class ClientBase:
    """Channel set-up shared by RagClient (grpc) and AsyncRagClient (grpc.aio).

    Args:
        target: "host:port" (any gRPC target string, e.g. "dns:///rag.example.com:443").
        tls: use TLS with the system's root certificates (implied by any certificate below).
        root_certificates: PEM (bytes or a file path) of the CA that signed the server's certificate.
        certificate_chain, private_key: PEM of this client's certificate and key, for mutual TLS.
        token: sent as "authorization: Bearer <token>" with every call.
        timeout: default seconds per call (a gRPC deadline covering its retries); None = no limit.
        retry: backoff for UNAVAILABLE where repeating is safe (see RetryPolicy); NO_RETRY to disable.
        keepalive_time: seconds between HTTP/2 pings on the connection; None = gRPC's default (off).
        keepalive_timeout: seconds to wait for a ping's answer before the connection is dropped.
        max_message_bytes: largest message sent or received.
        options: raw gRPC channel options, applied last.
        application: sent as "application" metadata, which Ray Serve's gRPC proxy routes by when
            it serves several applications (`ragmix cluster serve` names its own "ragmix").
    """

    _grpc: Any  # the module whose channels this client opens: grpc or grpc.aio

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        token: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
        keepalive_time: float | None = None,
        keepalive_timeout: float = 20.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        application: str | None = None,
    ) -> None:
        self._conn = Connection.build(
            target,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            token=token,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            max_message_bytes=max_message_bytes,
            options=options,
            application=application,
        )
        self.target = target
        self.timeout = timeout
        self.retry = retry
        if self._conn.credentials is None:
            self._channel = self._grpc.insecure_channel(target, options=self._conn.options)
        else:
            self._channel = self._grpc.secure_channel(
                target, self._conn.credentials, options=self._conn.options
            )
        self._stub = pb_grpc.RagServiceStub(self._channel)
        # A generic call with hand-written codecs: no grpcio-health-checking dependency.
        self._health = self._channel.unary_unary(
            _health.METHOD,
            request_serializer=_health.encode_request,
            response_deserializer=_health.decode_response,
        )

    def _deadline(self, timeout: float | None) -> Deadline:
        """Per-call timeout, else the client's default."""
        return Deadline(self.timeout if timeout is None else timeout)


class Deadline:
    """One deadline for a call and all its retries (None = no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def allows(self, delay: float) -> bool:
        """Whether waiting `delay` seconds still leaves time for another attempt."""
        return self.at is None or time.monotonic() + delay < self.at


def generate_request(
    query: str,
    *,
    top_k: int,
    mixture: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k_tokens: int,
    seed: int | None,
    stop: Sequence[str],
    num_beams: int,
    retrieval_temperature: float,
    passage_ids: Sequence[str],
    min_new_tokens: int = 0,
    top_n: int = 0,
    num_return_sequences: int = 0,
    fast_sequence_decoding: bool = False,
    nprobe: int = 0,
    ef_search: int = 0,
) -> pb.GenerateRequest:
    if mixture not in MIXTURES:
        raise ValueError(f"mixture must be one of {', '.join(MIXTURES)}, got {mixture!r}.")
    if isinstance(stop, str):
        stop = [stop]
    decoding = pb.DecodingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k_tokens,
        stop=list(stop),
        num_beams=num_beams,
        min_new_tokens=min_new_tokens,
        top_n=top_n,
        num_return_sequences=num_return_sequences,
        fast_sequence_decoding=fast_sequence_decoding,
    )
    if seed is not None:
        decoding.seed = seed
    return pb.GenerateRequest(
        query=query,
        top_k=top_k,
        mixture=MIXTURES[mixture],
        decoding=decoding,
        retrieval_temperature=retrieval_temperature,
        passage_ids=list(passage_ids),
        nprobe=nprobe,
        ef_search=ef_search,
    )


def score_request(
    query: str,
    answer: str,
    *,
    top_k: int,
    passage_ids: Sequence[str],
    retrieval_temperature: float,
    nprobe: int = 0,
    ef_search: int = 0,
) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        query=query,
        answer=answer,
        top_k=top_k,
        passage_ids=list(passage_ids),
        retrieval_temperature=retrieval_temperature,
        nprobe=nprobe,
        ef_search=ef_search,
    )


def retrieve_request(
    query: str, *, top_k: int, retrieval_temperature: float, nprobe: int = 0, ef_search: int = 0
) -> pb.RetrieveRequest:
    return pb.RetrieveRequest(
        query=query,
        top_k=top_k,
        retrieval_temperature=retrieval_temperature,
        nprobe=nprobe,
        ef_search=ef_search,
    )
