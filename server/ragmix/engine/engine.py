"""The engine's asyncio front door: check, retrieve, build the request, hand it to the core.

Everything that can refuse a request does so here, before its first event: parameters, queue
capacity, then (after retrieval, which the prompts need) the context length, the batch's rows and
its KV budget. Requests are built in one place (`_build`), off the event loop, and the core
(core.py) runs them on its own thread; events come back through a thread-safe sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from ragmix.config import ServerConfig
from ragmix.engine.admin import AdminLimits, IndexAdmin
from ragmix.engine.core import CoreConfig, EngineCore
from ragmix.engine.observer import EngineObserver
from ragmix.engine.outputs import DoneEvent, Event, PassagesEvent, RetrievedPassage, TokenEvent
from ragmix.engine.params import DecodingParams, Limits, Mixture, RetrievalParams
from ragmix.engine.prompts import (
    PromptTemplate,
    PromptTokens,
    concat_text,
    passage_text,
    tokenize_prompt,
)
from ragmix.engine.request import Request, ScoreRequest, SequenceRequest, TokenRequest
from ragmix.engine.retrieval import RetrievalBatcher
from ragmix.engine.scheduler import SchedulerLimits
from ragmix.engine.score import ScoreResult, normalize_log_prior
from ragmix.engine.sequence import BeamState
from ragmix.errors import UnavailableError, ValidationError
from ragmix.models.generator import Generator

LOG = logging.getLogger(__name__)

_SERVER = ServerConfig()  # the one home of every default (Limits takes its defaults there too)


def _default(name: str):
    return field(default=getattr(_SERVER, name))


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; defaults and values come from ServerConfig (`from_server`)."""

    limits: Limits = field(default_factory=lambda: EngineConfig.limits_from(_SERVER))
    max_concurrent_requests: int = _default("max_concurrent_requests")
    max_queued_requests: int = _default("max_queued_requests")
    max_batch_rows: int = _default("max_batch_rows")
    max_batch_tokens: int = _default("max_batch_tokens")
    max_prefill_tokens: int = _default("max_prefill_tokens")
    passage_cache_bytes: int = _default("passage_cache_bytes")
    admin: AdminLimits = field(
        default_factory=lambda: AdminLimits(_SERVER.max_admin_batch, _SERVER.max_passage_chars)
    )

    @staticmethod
    def limits_from(config: ServerConfig) -> Limits:
        return Limits(**{f.name: getattr(config, f.name) for f in fields(Limits)})

    @classmethod
    def from_server(cls, config: ServerConfig) -> EngineConfig:
        """Every engine setting, taken by name from the validated server settings."""
        values = {
            f.name: getattr(config, f.name)
            for f in fields(cls)
            if f.name not in ("limits", "admin")
        }
        admin = AdminLimits(config.max_admin_batch, config.max_passage_chars)
        return cls(limits=cls.limits_from(config), admin=admin, **values)

    def core(self) -> CoreConfig:
        names = [f.name for f in fields(SchedulerLimits)]
        return CoreConfig(
            SchedulerLimits(**{n: getattr(self, n) for n in names}), self.passage_cache_bytes
        )


class _Sink:
    """Events posted from the engine thread onto the caller's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.request: Request | None = None

    def __call__(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            if self.request is not None:
                self.request.cancelled = True


class Engine:
    def __init__(
        self,
        generator: Generator,
        retrieval: RetrievalBatcher,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        step_gate: Callable[[Sequence[Request]], None] | None = None,
        device: str = "cpu",
    ) -> None:
        self.generator = generator
        self.device = device  # where the models run: "cpu" or "cuda:N"
        self.retrieval = retrieval
        self.config = config
        self.template = PromptTemplate.parse(generator.prompt_template)
        self.observer = observer or EngineObserver()
        self.core = EngineCore(generator, config.core(), self.observer, step_gate)
        self.passage_cache = self.core.passage_cache
        self.admin = IndexAdmin(retrieval, config.admin, self._check_accepting, self.observer)
        self._accepting = True
        self._ids = itertools.count()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.core.start()

    def stop_admitting(self) -> None:
        """New requests get UNAVAILABLE; requests already admitted or waiting run to completion."""
        self._accepting = False

    @property
    def in_flight(self) -> int:
        return self.core.in_flight

    def shutdown(self) -> None:
        """Stop the core; requests still in flight end with UNAVAILABLE."""
        self._accepting = False
        self.core.stop()
        self.retrieval.close()

    # ----------------------------------------------------------------- RPCs

    async def retrieve(self, params: RetrievalParams) -> tuple[list[RetrievedPassage], float]:
        """Top-K passages with their prior, and the retrieval time in milliseconds."""
        params.verify(self.config.limits)
        self._check_accepting()
        return await self.retrieval.retrieve(params)

    async def generate(
        self, retrieval: RetrievalParams, decoding: DecodingParams, mixture: Mixture
    ) -> AsyncIterator[Event]:
        """Stream PassagesEvent, then a TokenEvent per token, then DoneEvent.

        Closing the iterator early (client cancelled, deadline passed) frees the request's rows at
        the engine's next step.
        """
        arrival = time.perf_counter()
        limits = self.config.limits
        retrieval.verify(limits)
        decoding.verify(limits)
        if mixture is Mixture.SEQUENCE and decoding.min_new_tokens:
            raise ValidationError(
                "min_new_tokens",
                "min_new_tokens applies to MIXTURE_TOKEN and MIXTURE_CONCAT; RAG-Sequence beams "
                f"end where the model ends them, got min_new_tokens={decoding.min_new_tokens}.",
            )
        self._check_accepting()
        self.core.check_capacity()
        passages, retrieval_ms = await self.retrieval.retrieve(retrieval)
        sink = _Sink()
        request = await asyncio.to_thread(
            self._build_generate, passages, retrieval.query, decoding, mixture, sink
        )
        request.arrival, request.retrieval_ms = arrival, retrieval_ms
        sink.request = request
        self._check_accepting()
        self.core.submit(request)  # the last refusal (queue full) comes before the first event
        finished = False
        try:
            yield PassagesEvent(passages)
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = isinstance(item, DoneEvent)
                yield self._with_alternatives(item)
        finally:
            if not finished:
                self.core.cancel(request)

    async def score(
        self, retrieval: RetrievalParams, answer: str
    ) -> tuple[list[RetrievedPassage], ScoreResult]:
        """log p(answer | question) under TOKEN, SEQUENCE and CONCAT, as prefill rows of the batch."""
        limits = self.config.limits
        retrieval.verify(limits)
        if not answer.strip():
            raise ValidationError("answer", "answer must be non-empty text to score.")
        if len(answer) > limits.max_query_chars * 4:
            raise ValidationError(
                "answer",
                f"answer must be at most {limits.max_query_chars * 4} characters, "
                f"got {len(answer)}.",
            )
        self._check_accepting()
        self.core.check_capacity()
        passages, _ = await self.retrieval.retrieve(retrieval)
        sink = _Sink()
        request = await asyncio.to_thread(
            self._build_score, passages, retrieval.query, answer, sink
        )
        sink.request = request
        self.core.submit(request)
        try:
            item = await sink.queue.get()
        except BaseException:
            self.core.cancel(request)
            raise
        if isinstance(item, BaseException):
            raise item
        return passages, item

    # ----------------------------------------------------------------- building requests

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise UnavailableError("the server is shutting down; retry on another replica.")

    def _with_alternatives(self, ev: object) -> object:
        """Token texts of the top-n alternatives, decoded here rather than on the engine thread."""
        if isinstance(ev, TokenEvent) and ev.top:
            decode = self.generator.decode
            return dataclasses.replace(ev, top=[(i, decode([i]), lp) for i, _, lp in ev.top])
        return ev

    def _prompts(self, passages: list[RetrievedPassage], question: str) -> list[PromptTokens]:
        form = self.generator.passage_template
        return [self._prompt(passage_text(p.title, p.text, form), question) for p in passages]

    def _concat_prompt(self, passages: list[RetrievedPassage], question: str) -> PromptTokens:
        form = self.generator.passage_template
        return self._prompt(concat_text([(p.title, p.text) for p in passages], form), question)

    def _prompt(self, passage: str, question: str) -> PromptTokens:
        g = self.generator
        return tokenize_prompt(self.template, g.encode, passage, question, g.decoder_start_ids)

    def _build_generate(
        self,
        passages: list[RetrievedPassage],
        question: str,
        decoding: DecodingParams,
        mixture: Mixture,
        sink: _Sink,
    ) -> TokenRequest:
        """The request for a Generate call, or the ValidationError that refuses it."""
        with np.errstate(divide="ignore"):
            log_prior = np.log(np.array([p.prior for p in passages], np.float64))  # K
        common = dict(
            id=f"r{next(self._ids)}",
            emit=sink,
            arrival=0.0,
            retrieval_ms=0.0,
            max_new_tokens=decoding.max_new_tokens,
            mixture=mixture,
            decoding=decoding,
            passages=passages,
            decode_text=self.generator.decode,
            eos_ids=self.generator.eos_token_ids,
        )
        if mixture is Mixture.CONCAT:
            prompts = [self._concat_prompt(passages, question)]
            request: TokenRequest = TokenRequest(
                prompts=prompts, max_rows=1, log_prior=np.zeros(1, np.float32), **common
            )
        elif mixture is Mixture.SEQUENCE:
            prompts = self._prompts(passages, question)
            norm = normalize_log_prior(log_prior, len(passages))
            active = [int(j) for j in np.flatnonzero(np.isfinite(norm))]
            request = SequenceRequest(
                prompts=prompts,
                max_rows=len(active) * decoding.num_beams,
                log_prior=log_prior.astype(np.float32),
                norm_prior=norm,
                active=active,
                beams=[BeamState() for _ in active],
                **common,
            )
        else:
            prompts = self._prompts(passages, question)
            request = TokenRequest(
                prompts=prompts,
                max_rows=len(prompts),
                log_prior=log_prior.astype(np.float32),
                **common,
            )
        self._check_fits(request, "max_new_tokens")
        return request

    def _build_score(
        self, passages: list[RetrievedPassage], question: str, answer: str, sink: _Sink
    ) -> ScoreRequest:
        answer_ids = self.generator.encode(answer)
        limit = self.config.limits.max_new_tokens
        if not answer_ids:
            raise ValidationError("answer", "answer must contain at least one token, got none.")
        if len(answer_ids) > limit:
            raise ValidationError(
                "answer", f"answer must be at most {limit} tokens, got {len(answer_ids)}."
            )
        with np.errstate(divide="ignore"):
            log_prior = np.log(np.array([p.prior for p in passages], np.float64))  # K
        request = ScoreRequest(
            id=f"s{next(self._ids)}",
            emit=sink,
            prompts=[*self._prompts(passages, question), self._concat_prompt(passages, question)],
            arrival=time.perf_counter(),
            retrieval_ms=0.0,
            max_new_tokens=len(answer_ids),
            max_rows=0,
            answer_ids=answer_ids,
            norm_prior=normalize_log_prior(log_prior, len(passages)),
        )
        self._check_fits(request, "answer")
        return request

    def _check_fits(self, r: Request, what: str) -> None:
        """Context length, batch rows and KV budget: refused now rather than after streaming."""
        cfg = self.config
        longest = max(len(p.ids) for p in r.prompts)
        shorter = "a shorter answer" if what == "answer" else f"fewer tokens ({what})"
        fewer = f"{shorter} or fewer passages (top_k, passage_ids)"
        if self.generator.is_encoder_decoder:
            self._check_source(r, what, fewer)
        elif r.max_length > self.generator.max_positions:
            raise ValidationError(
                what,
                f"the prompt ({longest} tokens) plus {r.max_new_tokens} new tokens exceeds the "
                f"generator's context of {self.generator.max_positions} tokens; ask for {fewer}.",
            )
        if r.max_rows > cfg.max_batch_rows:
            raise ValidationError(
                "num_beams",
                f"{r.max_rows} rows (passages x num_beams) exceed the server's "
                f"max_batch_rows of {cfg.max_batch_rows}; ask for fewer beams (num_beams) or "
                "passages (top_k).",
            )
        if r.max_rows * r.max_length > cfg.max_batch_tokens:
            raise ValidationError(
                what,
                f"{r.max_rows} rows x ({longest} prompt + {r.max_new_tokens} new tokens) "
                f"exceeds the server's KV budget of {cfg.max_batch_tokens} token slots "
                f"(--max-batch-tokens); ask for {fewer}.",
            )

    def _check_source(self, r: Request, what: str, fewer: str) -> None:
        """An encoder-decoder's two contexts: the encoder's input, the decoder's tokens."""
        g = self.generator
        source = max(p.source for p in r.prompts)
        if source > g.max_source_positions:
            raise ValidationError(
                "query" if what != "answer" else what,
                f"the encoder input ({source} tokens: passage and question) exceeds the "
                f"generator's {g.max_source_positions} source positions; ask a shorter question "
                "or use fewer passages (top_k, passage_ids; Concat reads them all at once).",
            )
        longest = max(len(p.ids) - p.source for p in r.prompts) + r.max_new_tokens
        if longest > g.max_positions:
            raise ValidationError(
                what,
                f"{longest} decoder tokens (start tokens and {r.max_new_tokens} new) exceed the "
                f"generator's {g.max_positions} decoder positions; ask for {fewer}.",
            )
