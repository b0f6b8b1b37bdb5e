"""The serving engine: one thread owns the generator and runs the token loop for every request.

Each step (continuous batching):
    admit    waiting requests join: their K prompts are prefilled together
    decode   one generator pass over all running rows of all requests
    mix      one kernel call turns all [rows, vocab] logits into per-request tokens
    update   tokens are streamed; finished and cancelled requests leave the batch

The asyncio side (`generate`) never runs model work: it awaits events the engine thread posts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from ragmix import kernels
from ragmix.engine import kv
from ragmix.engine.observer import EngineObserver
from ragmix.engine.outputs import (
    DoneEvent,
    Event,
    PassagesEvent,
    RetrievedPassage,
    ScoredSequence,
)
from ragmix.engine.params import DecodingParams, Limits, Mixture, RetrievalParams
from ragmix.engine.prefix_cache import PassageCache, prefix_key
from ragmix.engine.prompts import (
    PromptTemplate,
    PromptTokens,
    concat_text,
    passage_text,
    tokenize_prompt,
)
from ragmix.engine.request import Request
from ragmix.engine.retrieval import RetrievalBatcher
from ragmix.engine.score import ScoreResult, score_answer
from ragmix.engine.sequence import rag_sequence
from ragmix.errors import OverloadedError, UnavailableError, ValidationError
from ragmix.models.generator import Generator

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    limits: Limits = field(default_factory=Limits)
    max_concurrent_requests: int = 16  # requests in the running batch
    max_queued_requests: int = 64  # requests waiting for admission
    max_batch_rows: int = 64  # passage rows in the running batch
    max_prefill_rows: int = 32  # rows prefilled in one step (bounds a step's latency and memory)
    passage_cache_bytes: int = 1 << 30  # passage prefix KV cache budget; 0 = off
    max_batch_tokens: int = 1 << 16  # KV slots (rows x length) the running batch may reach


class Engine:
    def __init__(
        self, generator: Generator, retrieval: RetrievalBatcher, config: EngineConfig
    ) -> None:
        self.generator = generator
        self.retrieval = retrieval
        self.config = config
        self.template = PromptTemplate.parse(generator.prompt_template)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        # Whole-request model work (Score, RAG-Sequence beam search) runs on the engine thread
        # between steps, so one thread owns the generator.
        self._jobs: collections.deque[tuple[Callable[[], object], concurrent.futures.Future]] = (
            collections.deque()
        )
        self._batch = kv.Batch.empty(generator)
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="ragmix-engine", daemon=True)
        self.passage_cache = (
            PassageCache(config.passage_cache_bytes) if config.passage_cache_bytes > 0 else None
        )
        self.observer = EngineObserver()
        retrieval.on_batch = lambda n, seconds: self.observer.on_retrieval(n, seconds)

    # ----------------------------------------------------------------- lifecycle (any thread)

    def start(self) -> None:
        kernels.warmup()
        self._thread.start()

    def stop_admitting(self) -> None:
        """New requests get UNAVAILABLE; requests already admitted or waiting run to completion."""
        self._accepting = False

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._running)

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight end with UNAVAILABLE."""
        self._accepting = False
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.retrieval.close()

    # ----------------------------------------------------------------- asyncio API

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
        self._check_capacity()
        passages, retrieval_ms = await self.retrieval.retrieve(retrieval)
        yield PassagesEvent(passages)

        prompts, log_prior = await asyncio.to_thread(
            self._prompts, passages, retrieval.query, mixture, decoding.max_new_tokens
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        if mixture is Mixture.SEQUENCE:
            async for ev in self._generate_sequence(
                retrieval.query, passages, prompts, log_prior, decoding, arrival, retrieval_ms
            ):
                yield ev
            return

        def emit(ev: Event | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                request.cancelled = True

        request = Request(
            id=f"r{next(self._ids)}",
            mixture=mixture,
            decoding=decoding,
            passages=passages,
            prompts=prompts,
            log_prior=log_prior,
            emit=emit,
            decode_text=self.generator.decode,
            eos_ids=self.generator.eos_token_ids,
            arrival=arrival,
            retrieval_ms=retrieval_ms,
        )
        self._submit(request)
        finished = False
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    finished = True
                    raise ev
                if isinstance(ev, DoneEvent):
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request)

    async def _generate_sequence(
        self,
        question: str,
        passages: list[RetrievedPassage],
        prompts: list,
        log_prior: np.ndarray,
        decoding: DecodingParams,
        arrival: float,
        retrieval_ms: float,
    ) -> AsyncIterator[Event]:
        """RAG-Sequence: beams per passage and marginalisation as one engine job, then stream."""
        admitted = time.perf_counter()
        answer = await self._run_job(
            lambda: rag_sequence(
                self.generator,
                self.template,
                [(p.title, p.text) for p in passages],
                log_prior,
                question,
                num_beams=decoding.num_beams,
                max_new_tokens=decoding.max_new_tokens,
                mode="fast" if decoding.fast_sequence_decoding else "thorough",
                num_return_sequences=decoding.num_return_sequences,
            )
        )
        done = time.perf_counter()
        out: list[Event] = []
        request = Request(
            id=f"r{next(self._ids)}",
            mixture=Mixture.SEQUENCE,
            decoding=decoding,
            passages=passages,
            prompts=prompts,
            log_prior=log_prior,
            emit=out.append,
            decode_text=self.generator.decode,
            eos_ids=self.generator.eos_token_ids,
            arrival=arrival,
            retrieval_ms=retrieval_ms,
        )
        request.admitted, request.prefill_ms = admitted, (done - admitted) * 1e3
        request.final_posterior = [float(p) for p in answer.posterior]
        eos = self.generator.eos_token_ids
        request.sequences = [
            ScoredSequence(
                # A trailing partial UTF-8 character is not text (the stream holds it back too).
                self.generator.decode([t for t in c.ids if t not in eos]).rstrip("\ufffd"),
                c.ids,
                c.logprob,
                [float(p) for p in c.posterior],
            )
            for c in answer.ranked
        ]
        for i, token in enumerate(answer.ids):
            finished = request.on_token(
                token, float(answer.token_logprobs[i]), answer.responsibilities[i], []
            )
            while out:
                yield out.pop(0)
            if finished:
                self.observer.on_finish(request.finish_reason, len(request.tokens))
                return

    async def score(
        self, retrieval: RetrievalParams, answer: str
    ) -> tuple[list[RetrievedPassage], ScoreResult]:
        """log p(answer | question) under TOKEN, SEQUENCE and CONCAT, from one batched pass."""
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
        self._check_capacity()
        passages, _ = await self.retrieval.retrieve(retrieval)
        with np.errstate(divide="ignore"):
            log_prior = np.log(np.array([p.prior for p in passages], np.float64))

        def job() -> ScoreResult:
            n = len(self.generator.encode(answer))
            if n > limits.max_new_tokens:
                raise ValidationError(
                    "answer",
                    f"answer must be at most {limits.max_new_tokens} tokens, got {n}.",
                )
            return score_answer(
                self.generator,
                self.template,
                [(p.title, p.text) for p in passages],
                log_prior,
                retrieval.query,
                answer,
            )

        return passages, await self._run_job(job)

    async def _run_job(self, fn: Callable[[], object]):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._jobs.append((fn, fut))
            self._cv.notify()
        return await asyncio.wrap_future(fut)

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._cv:
            self._cv.notify()

    # ----------------------------------------------------------------- admission

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise UnavailableError("the server is shutting down; retry on another replica.")

    def _check_capacity(self) -> None:
        self._check_accepting()
        cfg = self.config
        with self._cv:
            free_slots = cfg.max_concurrent_requests - len(self._running)
            if len(self._waiting) - max(free_slots, 0) >= cfg.max_queued_requests:
                raise OverloadedError(
                    f"the server is at capacity ({cfg.max_concurrent_requests} running, "
                    f"{len(self._waiting)} queued, max_queued_requests={cfg.max_queued_requests}); "
                    "retry later."
                )

    def _submit(self, request: Request) -> None:
        self._check_capacity()
        with self._cv:
            self._waiting.append(request)
            self._cv.notify()

    def _prompts(
        self,
        passages: list[RetrievedPassage],
        question: str,
        mixture: Mixture,
        max_new_tokens: int,
    ) -> tuple[list, np.ndarray]:
        encode = self.generator.encode
        if mixture is Mixture.CONCAT:
            slot = concat_text([(p.title, p.text) for p in passages])
            prompts = [tokenize_prompt(self.template, encode, slot, question)]
            log_prior = np.zeros(1, np.float32)
        else:
            prompts = [
                tokenize_prompt(self.template, encode, passage_text(p.title, p.text), question)
                for p in passages
            ]
            with np.errstate(divide="ignore"):
                log_prior = np.log(np.array([p.prior for p in passages], np.float64))
            log_prior = log_prior.astype(np.float32)
        longest = max(len(p.ids) for p in prompts)
        if len(prompts) * (longest + max_new_tokens) > self.config.max_batch_tokens:
            raise ValidationError(
                "max_new_tokens",
                f"{len(prompts)} passage rows x ({longest} prompt + {max_new_tokens} new tokens) "
                f"exceeds the server's KV budget of {self.config.max_batch_tokens} token slots "
                "(--max-batch-tokens); ask for fewer tokens or fewer passages.",
            )
        if longest + max_new_tokens > self.generator.max_positions:
            raise ValidationError(
                "max_new_tokens",
                f"the prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"generator's context of {self.generator.max_positions} tokens; ask for fewer "
                "tokens or fewer passages.",
            )
        return prompts, log_prior

    def _admit(self) -> list[Request]:
        """Pop waiting requests that fit the running batch's limits (FIFO, no overtaking)."""
        cfg = self.config
        admitted: list[Request] = []
        rows = self._batch.rows
        # The batch's KV is rows x length and every step adds a slot to every row: admit only
        # what keeps the worst case (all rows until the longest request ends) within budget.
        length = self._batch.length
        steps = max((r.remaining_tokens for r in self._running), default=0)
        with self._cv:
            while self._waiting:
                r = self._waiting[0]
                if r.cancelled:
                    self._waiting.popleft()
                    continue
                new_rows = sum(a.rows for a in admitted) + r.rows
                new_length = max(length, r.max_prompt_tokens)
                new_steps = max(steps, r.remaining_tokens)
                if (
                    len(self._running) + len(admitted) >= cfg.max_concurrent_requests
                    or rows + new_rows > cfg.max_batch_rows
                    or (admitted and new_rows > cfg.max_prefill_rows)
                    or (
                        (rows or admitted)
                        and (rows + new_rows) * (new_length + new_steps) > cfg.max_batch_tokens
                    )
                ):
                    break
                admitted.append(self._waiting.popleft())
                length, steps = new_length, new_steps
        return admitted

    # ----------------------------------------------------------------- the token loop

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._jobs or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # delivered to the caller, who maps it to a status
                        fut.set_exception(e)
            try:
                self.step()
            except Exception as e:  # a bug: fail the requests in flight, keep serving the next
                LOG.exception("engine step failed; failing %d requests", len(self._running))
                for r in self._running:
                    r.emit(e)
                self._running = []
                self._batch = kv.Batch.empty(self.generator)
        err = UnavailableError("the server shut down before this request finished.")
        with self._cv:
            for r in [*self._running, *self._waiting]:
                r.emit(err)
            self._running, self._waiting = [], collections.deque()
            for _, fut in self._jobs:
                fut.set_exception(err)
            self._jobs.clear()

    def step(self) -> None:
        t0 = time.perf_counter()
        self._drop_cancelled()
        new = self._admit()
        if not (new or self._running):
            self.observer.on_queue(len(self._waiting), 0, self._batch.rows)
            return

        logits = []
        if self._running:
            logits.append(kv.decode(self.generator, self._batch))  # rows x V
        if new:
            tp = time.perf_counter()
            new_logits, new_batch, cached = self._prefill([p for r in new for p in r.prompts])
            prefill_ms = (time.perf_counter() - tp) * 1e3
            row = 0
            for r in new:
                r.admitted, r.prefill_ms = tp, prefill_ms
                r.cached_prompt_tokens = sum(cached[row : row + r.rows])
                row += r.rows
            logits.append(new_logits)
            self._batch = kv.concat(self._batch, new_batch)
            self._running.extend(new)
        reqs = self._running
        all_logits = logits[0] if len(logits) == 1 else np.concatenate(logits)  # rows x V
        eos = list(self.generator.eos_token_ids)
        row = 0
        for r in reqs:  # min_new_tokens: no EOS yet, for every passage of the request
            if len(r.tokens) < r.decoding.min_new_tokens:
                all_logits[row : row + r.rows, eos] = -np.inf
            row += r.rows

        # One kernel call for every request: mixture, choice, responsibilities.
        offsets = np.zeros(len(reqs) + 1, np.int64)
        np.cumsum([r.rows for r in reqs], out=offsets[1:])
        top_n = max(r.decoding.top_n for r in reqs)
        res = kernels.mixture_step(
            all_logits,
            np.concatenate([r.log_prior for r in reqs]),
            offsets,
            np.array([r.decoding.temperature for r in reqs], np.float32),
            np.array([r.decoding.top_k for r in reqs], np.int32),
            np.array([r.decoding.top_p for r in reqs], np.float32),
            np.array([r.draw() for r in reqs], np.float64),
            top_n,
        )

        keep: list[int] = []
        still: list[Request] = []
        for g, r in enumerate(reqs):
            a, b = offsets[g], offsets[g + 1]
            n = r.decoding.top_n
            top = [
                (i, self.generator.decode([i]), lp)
                for i, lp in zip(
                    res.top_ids[g, :n].tolist(), res.top_logprobs[g, :n].tolist(), strict=True
                )
                if i >= 0
            ]
            token = int(res.token[g])
            previous = r.last_token_time
            finished = r.on_token(token, float(res.logprob[g]), res.responsibility[a:b], top)
            if len(r.tokens) == 1:
                self.observer.on_first_token(r.first_token - r.arrival)
            else:
                self.observer.on_inter_token(r.last_token_time - previous)
            if finished:
                self.observer.on_finish(r.finish_reason, len(r.tokens))
                continue
            self._batch.last[a:b] = token
            keep.extend(range(a, b))
            still.append(r)
        if len(still) != len(reqs):
            self._batch = kv.select(self._batch, np.array(keep, np.int64))
        self._running = still
        self.observer.on_step(int(offsets[-1]), len(reqs), time.perf_counter() - t0)
        self.observer.on_queue(len(self._waiting), len(self._running), self._batch.rows)

    def _prefill(self, prompts: list[PromptTokens]) -> tuple[np.ndarray, kv.Batch, list[int]]:
        """Prefill new rows, taking passage prefixes from the cache and caching the ones missed.

        Returns rows x V logits, the rows' KV batch and each row's count of cached prompt tokens.
        """
        cache = self.passage_cache
        if cache is None:
            logits, batch = kv.prefill(self.generator, [p.ids for p in prompts])
            self.observer.on_prefill(len(prompts), batch.mask.sum(), 0, 0.0)
            return logits, batch, [0] * len(prompts)
        t0 = time.perf_counter()
        keys = [prefix_key(self.generator.fingerprint, p.passage) for p in prompts]
        hits = [cache.get(k) for k in keys]
        todo = [p.rest if h else p.ids for p, h in zip(prompts, hits, strict=True)]
        logits, batch = kv.prefill(self.generator, todo, [h.past if h else None for h in hits])
        stored: set[bytes] = set()
        for i, (p, h, k) in enumerate(zip(prompts, hits, keys, strict=True)):
            if h is None and p.passage and k not in stored:
                start = batch.length - len(todo[i])  # new tokens are right-aligned
                cache.put(k, p.passage, kv.row_slots(batch, i, start, len(p.passage)))
                stored.add(k)
        cached = [len(p.passage) if h else 0 for p, h in zip(prompts, hits, strict=True)]
        n_hits = sum(1 for h in hits if h)
        self.observer.on_passage_cache(n_hits, len(hits) - n_hits, cache.bytes, len(cache))
        self.observer.on_prefill(
            len(prompts), sum(len(t) for t in todo), sum(cached), time.perf_counter() - t0
        )
        return logits, batch, cached

    def _drop_cancelled(self) -> None:
        if not any(r.cancelled for r in self._running):
            return
        keep: list[int] = []
        still: list[Request] = []
        start = 0
        for r in self._running:
            if not r.cancelled:
                keep.extend(range(start, start + r.rows))
                still.append(r)
            else:
                LOG.info("request %s cancelled after %d tokens", r.id, len(r.tokens))
                self.observer.on_finish("cancelled", len(r.tokens))
            start += r.rows
        self._batch = kv.select(self._batch, np.array(keep, np.int64))
        self._running = still
