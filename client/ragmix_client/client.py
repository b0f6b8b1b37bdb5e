"""Synchronous client. Every keyword argument mirrors a proto field; 0 / None = server default."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ragmix_client._proto import ragmix_pb2 as pb
from ragmix_client._proto import ragmix_pb2_grpc as pb_grpc
from ragmix_client.types import (
    MIXTURES,
    Answer,
    Done,
    Event,
    Info,
    Passage,
    Passages,
    RagmixError,
    Token,
    event_from_pb,
)


def _request(
    query: str,
    *,
    top_k: int = 0,
    mixture: str = "token",
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    sample_top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    num_beams: int = 0,
    retrieval_temperature: float = 0.0,
    passage_ids: Sequence[str] = (),
) -> pb.GenerateRequest:
    if mixture not in MIXTURES:
        raise ValueError(f"mixture must be one of {', '.join(MIXTURES)}, got {mixture!r}.")
    decoding = pb.DecodingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=sample_top_k,
        stop=list(stop),
        num_beams=num_beams,
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
    )


class RagClient:
    """A channel to one ragmix server. Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=list(options))
        self._stub = pb_grpc.RagServiceStub(self._channel)

    def __enter__(self) -> RagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, query: str, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[Event]:
        """Stream Passages, then one Token per token, then Done. Breaking out cancels the RPC."""
        call = self._stub.Generate(_request(query, **kwargs), timeout=timeout or self.timeout)
        try:
            for m in call:
                yield event_from_pb(m)
        except grpc.RpcError as e:
            raise RagmixError(e.code(), e.details() or "") from None
        finally:
            call.cancel()

    def generate_text(self, query: str, **kwargs: Any) -> Answer:
        passages: list[Passage] = []
        tokens: list[Token] = []
        for ev in self.generate(query, **kwargs):
            if isinstance(ev, Passages):
                passages = ev.passages
            elif isinstance(ev, Token):
                tokens.append(ev)
            elif isinstance(ev, Done):
                return Answer(ev.text, passages, tokens, ev)
        raise RagmixError(grpc.StatusCode.UNKNOWN, "the stream ended without a done event")

    def retrieve(
        self,
        query: str,
        *,
        top_k: int = 0,
        retrieval_temperature: float = 0.0,
        timeout: float | None = None,
    ) -> list[Passage]:
        req = pb.RetrieveRequest(
            query=query, top_k=top_k, retrieval_temperature=retrieval_temperature
        )
        try:
            resp = self._stub.Retrieve(req, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise RagmixError(e.code(), e.details() or "") from None
        return [Passage.from_pb(p) for p in resp.passages]

    def info(self, *, timeout: float | None = None) -> Info:
        try:
            r = self._stub.GetInfo(pb.GetInfoRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise RagmixError(e.code(), e.details() or "") from None
        return Info(
            r.version,
            r.generator,
            r.encoder,
            r.index,
            r.passages,
            r.max_top_k,
            r.max_new_tokens,
            r.default_top_k,
            r.default_max_new_tokens,
        )

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """Serving status ("SERVING", "NOT_SERVING", ...) of the server ("") or of one service.

        Needs the grpcio-health-checking package (the server's install has it).
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            raise RagmixError(e.code(), e.details() or "") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
