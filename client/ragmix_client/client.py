"""Synchronous client. Every keyword argument mirrors a proto field; 0 / None = server default."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

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


class RagClient(ClientBase):
    """A channel to one ragmix server. Use as a context manager, or call close().

    RagClient(target="127.0.0.1:50051", *, tls=False, root_certificates=None,
    certificate_chain=None, private_key=None, token=None, timeout=None, retry=RetryPolicy(),
    keepalive_time=None, keepalive_timeout=20.0, max_message_bytes=16 MiB, options=()):
    see ClientBase for what each connection argument does.
    """

    _grpc = grpc

    def __enter__(self) -> RagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; RPCs still running are cancelled on the server."""
        self._channel.close()

    # --------------------------------------------------------------------------- Generate

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
    ) -> Iterator[Event]:
        """Stream one Passages event, then one Token per generated token, then Done.

        Breaking out of the loop (or closing the iterator) cancels the RPC on the server.

        Args:
            query: the question x.
            top_k: passages K to retrieve; 0 = server default (GetInfo.default_top_k).
            mixture: "token" (RAG-Token), "sequence" (RAG-Sequence) or "concat" (all K in one prompt).
            max_new_tokens: answer length limit; 0 = server default.
            temperature: sampling temperature of the mixture distribution; 0 = greedy.
            top_p: nucleus sampling mass in (0, 1]; 0 = off.
            top_k_tokens: sample among this many most probable tokens; 0 = off.
            seed: seed of the request's random generator (same seed, same tokens).
            stop: strings that end the answer (not included in it).
            num_beams: beams per passage for mixture="sequence"; 0 = server default.
            retrieval_temperature: tau of the prior softmax(score / tau); 0 = 1.0.
            passage_ids: condition on these index passages instead of retrieving.
            min_new_tokens: EOS cannot end the answer before this many tokens; 0 = no minimum.
            top_n: alternatives reported with each token (Token.alternatives), 0..20.
            num_return_sequences: mixture="sequence": best candidates in Done.sequences; 0 = 1.
            fast_sequence_decoding: mixture="sequence": ParlAI's "fast" marginalisation.
            nprobe: IVF-PQ indexes: inverted lists visited; 0 = server default (Info.index_type).
            ef_search: HNSW indexes: candidate list size, >= top_k; 0 = server default.
            timeout: seconds for the whole stream; None = the client's default.
        """
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

    def _stream(self, request: pb.GenerateRequest, deadline: Deadline) -> Iterator[Event]:
        delays = self.retry.delays()
        while True:
            call = self._stub.Generate(
                request, timeout=deadline.remaining(), metadata=self._conn.metadata
            )
            started = False
            try:
                for m in call:
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
            time.sleep(delay)

    def generate_text(self, query: str, **kwargs: Any) -> Answer:
        """Run `generate` to the end: the answer with its passages, tokens and posterior.

        Takes the same keyword arguments as `generate`.
        """
        answer = AnswerBuilder()
        for ev in self.generate(query, **kwargs):
            if (done := answer.add(ev)) is not None:
                return done
        raise AnswerBuilder.missing_done()

    # --------------------------------------------------------------------------- unary calls

    def score(
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
        return ScoreResult.from_pb(self._unary(self._stub.Score, request, timeout))

    def retrieve(
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
        resp = self._unary(self._stub.Retrieve, request, timeout)
        return [Passage.from_pb(p) for p in resp.passages]

    def info(self, *, timeout: float | None = None) -> Info:
        """Models, index, limits and version of the server."""
        return Info.from_pb(self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard health status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".

        service: "" for the server as a whole, or "ragmix.v1.RagService".
        """
        return self._unary(self._health, service, timeout)

    # --------------------------------------------------------------------------- helpers

    def _once(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        """One attempt, never retried (for calls that are not safe to repeat)."""
        try:
            return method(
                request,
                timeout=self._deadline(timeout).remaining(),
                metadata=self._conn.metadata,
            )
        except grpc.RpcError as e:
            raise RagmixError.from_rpc(e) from None

    def _unary(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        deadline = self._deadline(timeout)
        delays = self.retry.delays()
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._conn.metadata)
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() == UNAVAILABLE else None
                if delay is None or not deadline.allows(delay):
                    raise RagmixError.from_rpc(e) from None
            time.sleep(delay)
