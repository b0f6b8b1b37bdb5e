"""asyncio client (grpc.aio): the same methods as RagClient, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from ragmix_client._connection import (
    ClientBase,
    Deadline,
    generate_request,
    retrieve_request,
    score_request,
)
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.types import (
    Answer,
    AnswerBuilder,
    Event,
    Info,
    Passage,
    RagmixError,
    ScoreResult,
    event_from_pb,
)

R = TypeVar("R")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class AsyncRagClient(ClientBase):
    """asyncio twin of RagClient (same arguments, same results). Create it inside a running loop;
    use `async with`, or `await close()`.

    `generate` returns an async iterator: `async for ev in client.generate(...)`. Leaving the loop
    early cancels the RPC once the iterator is closed; wrap it in `contextlib.aclosing(...)` to
    cancel at the moment of the `break` rather than when the iterator is garbage-collected.
    """

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncRagClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; RPCs still running are cancelled on the server."""
        await self._channel.close()

    def generate(
        self,
        query: str,
        *,
        top_k: int = 0,
        mixture: str = "token",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k_tokens: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        num_beams: int = 0,
        retrieval_temperature: float = 0.0,
        passage_ids: Sequence[str] = (),
        min_new_tokens: int = 0,
        top_n: int = 0,
        num_return_sequences: int = 0,
        fast_sequence_decoding: bool = False,
        nprobe: int = 0,
        ef_search: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """Stream Passages, then one Token per generated token, then Done (see RagClient.generate)."""
        request = generate_request(
            query,
            top_k=top_k,
            mixture=mixture,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k_tokens=top_k_tokens,
            seed=seed,
            stop=stop,
            num_beams=num_beams,
            retrieval_temperature=retrieval_temperature,
            passage_ids=passage_ids,
            min_new_tokens=min_new_tokens,
            top_n=top_n,
            num_return_sequences=num_return_sequences,
            fast_sequence_decoding=fast_sequence_decoding,
            nprobe=nprobe,
            ef_search=ef_search,
        )
        return self._stream(request, self._deadline(timeout))

    async def _stream(
        self, request: pb.GenerateRequest, deadline: Deadline
    ) -> AsyncIterator[Event]:
        delays = self.retry.delays()
        while True:
            call = self._stub.Generate(
                request, timeout=deadline.remaining(), metadata=self._conn.metadata
            )
            started = False
            try:
                async for m in call:
                    started = True
                    yield event_from_pb(m)
                return
            except grpc.RpcError as e:
                # Once an event was seen the answer is under way: repeating it is not safe.
                delay = next(delays, None) if not started and e.code() == UNAVAILABLE else None
                if delay is None or not deadline.allows(delay):
                    raise RagmixError.from_rpc(e) from None
            finally:
                call.cancel()  # no-op when finished; frees the server's rows otherwise
            await asyncio.sleep(delay)

    async def generate_text(self, query: str, **kwargs: Any) -> Answer:
        """Run `generate` to the end (same keyword arguments): answer, passages, posterior."""
        answer = AnswerBuilder()
        async for ev in self.generate(query, **kwargs):
            if (done := answer.add(ev)) is not None:
                return done
        raise AnswerBuilder.missing_done()

    async def score(
        self,
        query: str,
        answer: str,
        *,
        top_k: int = 0,
        passage_ids: Sequence[str] = (),
        retrieval_temperature: float = 0.0,
        nprobe: int = 0,
        ef_search: int = 0,
        timeout: float | None = None,
    ) -> ScoreResult:
        """log p(answer | query) under the TOKEN, SEQUENCE and CONCAT mixtures, with posteriors."""
        request = score_request(
            query,
            answer,
            top_k=top_k,
            passage_ids=passage_ids,
            retrieval_temperature=retrieval_temperature,
            nprobe=nprobe,
            ef_search=ef_search,
        )
        return ScoreResult.from_pb(await self._unary(self._stub.Score, request, timeout))

    async def retrieve(
        self,
        query: str,
        *,
        top_k: int = 0,
        retrieval_temperature: float = 0.0,
        nprobe: int = 0,
        ef_search: int = 0,
        timeout: float | None = None,
    ) -> list[Passage]:
        """The top-K passages for `query` with their prior, without generating."""
        request = retrieve_request(
            query,
            top_k=top_k,
            retrieval_temperature=retrieval_temperature,
            nprobe=nprobe,
            ef_search=ef_search,
        )
        resp = await self._unary(self._stub.Retrieve, request, timeout)
        return [Passage.from_pb(p) for p in resp.passages]

    async def info(self, *, timeout: float | None = None) -> Info:
        """Models, index, limits and version of the server."""
        return Info.from_pb(await self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard health status ("SERVING", ...) of the server ("") or of one service."""
        return await self._unary(self._health, service, timeout)

    async def _unary(
        self, method: Callable[..., Awaitable[R]], request: Any, timeout: float | None
    ) -> R:
        deadline = self._deadline(timeout)
        delays = self.retry.delays()
        while True:
            try:
                return await method(
                    request, timeout=deadline.remaining(), metadata=self._conn.metadata
                )
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() == UNAVAILABLE else None
                if delay is None or not deadline.allows(delay):
                    raise RagmixError.from_rpc(e) from None
            await asyncio.sleep(delay)
