"""The engine core: one thread owns the generator and runs every request as rows of one step.

    step = schedule  (drop cancelled, admit, pick this step's prefill chunk)
         → forward   (one generator pass over the decode rows, one over the prefill chunk)
         → mix       (one kernel call per row-group kind: RAG-Token/Concat mixture, beam log-probs)
         → update    (write KV, stream tokens, advance beams, finish Score/rescoring, retire rows)

Forward and mix change nothing, so a step that raises is thrown away whole: each request's rows
are then run alone through forward and mix, the requests that raise alone end with the error and
the rest carry on at the next step (`_isolate`). Nothing is lost either way: every request popped
from the queue ends with its answer or a status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragmix import kernels
from ragmix.engine import kv
from ragmix.engine.observer import EngineObserver
from ragmix.engine.prefill import Chunk, ChunkOutput, PrefillRow, commit_chunk, run_chunk
from ragmix.engine.prefix_cache import PassageCache, prefix_key
from ragmix.engine.request import Request, ScoreRequest, SequenceRequest, TokenRequest
from ragmix.engine.rows import RunningBatch
from ragmix.engine.scheduler import Scheduler, SchedulerLimits
from ragmix.engine.sequence import log_softmax
from ragmix.errors import UnavailableError
from ragmix.models import arrays
from ragmix.models.generator import Generator

LOG = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """What one step runs: the decoding requests' batch rows and the prefill chunk."""

    decoding: list[Request]  # requests with decode rows
    chunk: Chunk
    chunk_owner: list[Request]  # per chunk row
    starting: list[Request]  # requests whose prompts all end with this chunk: they decode next
    rows: np.ndarray | None = None  # batch rows to run; None = all live rows (a probe: a subset)

    @property
    def requests(self) -> list[Request]:
        seen = dict.fromkeys([*self.decoding, *self.chunk_owner])
        return list(seen)

    @property
    def decode_rows(self) -> int:
        return sum(r.rows for r in self.decoding)

    def logit_rows(self, r: Request) -> np.ndarray:
        """Where request r's rows are in this step's decode logits."""
        if self.rows is None:
            return np.asarray(r.slots, np.int64)
        return np.arange(r.rows)  # a probe runs one request's rows, in its order

    def only(self, r: Request) -> StepPlan:
        """The same step restricted to one request's rows (to find which request fails)."""
        keep = [i for i, o in enumerate(self.chunk_owner) if o is r]
        chunk = Chunk([self.chunk.rows[i] for i in keep], [self.chunk.counts[i] for i in keep])
        decoding = [r] if r in self.decoding else []
        starting = [r] if r in self.starting else []
        rows = np.asarray(r.slots if decoding else [], np.int64)
        return StepPlan(decoding, chunk, [r] * len(keep), starting, rows)


@dataclass
class ForwardOutput:
    logits: np.ndarray  # decode rows x V (their new KV is in the batch, past their lengths)
    chunk: ChunkOutput | None


@dataclass
class Mixed:
    """The mix phase's results, per request."""

    tokens: dict[int, tuple] = field(default_factory=dict)  # id(TokenRequest) -> token results
    beams: dict[int, np.ndarray] = field(default_factory=dict)  # id(SequenceRequest) -> logp


@dataclass(frozen=True)
class CoreConfig:
    limits: SchedulerLimits
    passage_cache_bytes: int  # 0 = off


class EngineCore:
    def __init__(
        self,
        generator: Generator,
        config: CoreConfig,
        observer: EngineObserver | None = None,
        step_gate: Callable[[Sequence[Request]], None] | None = None,
    ) -> None:
        self.generator = generator
        self.observer = observer or EngineObserver()
        self.scheduler = Scheduler(config.limits)
        # An encoder reads passage and question together (bidirectionally): no passage prefix
        # KV exists to cache for an encoder-decoder generator.
        cached = config.passage_cache_bytes > 0 and not generator.is_encoder_decoder
        if config.passage_cache_bytes > 0 and not cached:
            LOG.info("passage prefix cache off: %s is an encoder-decoder generator", generator.name)
        self.passage_cache = PassageCache(config.passage_cache_bytes) if cached else None
        # Called before every step that has work: tests hold a stream open with it.
        self.step_gate = step_gate
        self.running: list[Request] = []  # admitted, in admission order
        self.max_rows = config.limits.max_batch_rows
        self.batch = RunningBatch(generator, self.max_rows)  # every running request's decode rows
        self.eos = np.array(sorted(generator.eos_token_ids), np.int64)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ragmix-engine", daemon=True)

    # ----------------------------------------------------------------- any thread

    def start(self) -> None:
        kernels.warmup()
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request (OverloadedError when the queue is full)."""
        with self._cv:
            self.scheduler.check_capacity(self.running)
            self.scheduler.waiting.append(request)
            self._cv.notify()

    def check_capacity(self) -> None:
        with self._cv:
            self.scheduler.check_capacity(self.running)

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._cv:
            self._cv.notify()

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self.scheduler.waiting) + len(self.running)

    def stop(self) -> None:
        """Stop the loop; requests still in flight end with UNAVAILABLE."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ----------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.scheduler.waiting or self.running or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                if self.step_gate is not None:
                    self.step_gate(self.running)
                self.step()
            except Exception as e:  # a bug outside forward/mix: end everything in flight, go on
                LOG.exception("engine step failed; failing %d requests", len(self.running))
                for r in list(self.running):
                    self._end(r, e)
                self.batch = RunningBatch(self.generator, self.max_rows)
        err = UnavailableError("the server shut down before this request finished.")
        with self._cv:
            for r in [*self.running, *self.scheduler.waiting]:
                r.emit(err)
            self.running, self.scheduler.waiting = [], type(self.scheduler.waiting)()

    def step(self) -> None:
        t0 = time.perf_counter()
        # 1. schedule: drop cancelled requests, admit waiting ones, choose the prefill chunk
        plan = self._schedule()
        if plan is None:
            return
        try:
            # 2. forward: one pass over all decode rows, one over the prefill chunk (pure)
            out = self._forward(plan)
            # 3. mix: one kernel call per row-group kind (pure)
            mixed = self._mix(plan, out)
        except Exception as err:
            self._isolate(plan, err)
            return
        # 4. update: write KV, stream, advance beams, finish prefill-only work, retire rows
        self._update(plan, out, mixed)
        self.observer.on_step(plan.decode_rows, len(plan.requests), time.perf_counter() - t0)
        self._report_queue()

    # ----------------------------------------------------------------- 1. schedule

    def _schedule(self) -> StepPlan | None:
        self._drop_cancelled()
        with self._cv:  # popped and running at once: in_flight never misses a request
            new, cancelled = self.scheduler.admit(self.running)
            self.running = [*self.running, *new]
        for r in cancelled:
            self._record_cancel(r, "while queued")
        for r in new:
            try:
                self._start_prefill(r)
            except Exception as e:  # a bug in building its rows: it alone ends
                LOG.exception("request %s could not start", r.id)
                self._end(r, e)
        if not self.running:
            self._report_queue()
            return None
        decoding = [r for r in self.running if r.rows]
        chunk, owner = self.scheduler.chunk(self.running)
        return StepPlan(decoding, chunk, owner, self._starting(chunk, owner))

    @staticmethod
    def _starting(chunk: Chunk, owner: list[Request]) -> list[Request]:
        """Requests about to decode whose last pending prompt rows this chunk completes."""
        piece = {id(row): n for row, n in zip(chunk.rows, chunk.counts, strict=True)}
        return [
            r
            for r in dict.fromkeys(owner)
            if r.starts_decoding
            and all(row.remaining == piece.get(id(row), 0) for row in r.prefill)
        ]

    def _start_prefill(self, r: Request) -> None:
        """The request's prompt rows, each continuing from its cached passage prefix if held."""
        r.admitted = time.perf_counter()
        keep = not isinstance(r, ScoreRequest)
        suffix = r.answer_ids if isinstance(r, ScoreRequest) else []
        prompts = r.prompts
        if isinstance(r, SequenceRequest):
            prompts = [r.prompts[j] for j in r.active]
        hits = 0
        for p in prompts:
            cache = self.passage_cache
            key = None
            if cache is not None and p.passage:
                key = prefix_key(self.generator.fingerprint, p.passage)
            cached = cache.get(key) if key else None
            if cached is not None:
                hits += 1
                r.cached_prompt_tokens += len(p.passage)
                row = PrefillRow(p.rest + suffix, [cached.past], len(suffix), keep, keep)
            else:
                row = PrefillRow(
                    p.ids + suffix, [], len(suffix), keep, keep, key, p.passage, source=p.source
                )
            r.prefill.append(row)
        if self.passage_cache is not None:
            cache = self.passage_cache
            self.observer.on_passage_cache(hits, len(prompts) - hits, cache.bytes, len(cache))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.running if r.cancelled]:
            self._retire(r)
            self._record_cancel(r)

    def _record_cancel(self, r: Request, where: str = "") -> None:
        LOG.info("request %s cancelled%s", r.id, f" {where}" if where else "")
        self.observer.on_finish("cancelled", len(getattr(r, "tokens", ())))

    # ----------------------------------------------------------------- 2. forward

    def _forward(self, plan: StepPlan) -> ForwardOutput:
        if plan.decoding:
            logits = self.batch.decode(self.generator, plan.rows)
        else:
            logits = np.zeros((0, self.generator.vocab_size), np.float32)
        chunk = None
        if plan.chunk.rows:
            t = time.perf_counter()
            chunk = run_chunk(self.generator, plan.chunk)
            cached = sum(row.prefix_len for row in plan.chunk.rows if row.done == 0)
            self.observer.on_prefill(
                len(plan.chunk.rows), sum(plan.chunk.counts), cached, time.perf_counter() - t
            )
        return ForwardOutput(logits, chunk)

    # ----------------------------------------------------------------- 3. mix

    def _mix(self, plan: StepPlan, out: ForwardOutput) -> Mixed:
        mixed = Mixed()
        decoding = [r for r in plan.decoding if not isinstance(r, SequenceRequest)]
        starting = [r for r in plan.starting if not isinstance(r, SequenceRequest)]
        if decoding or starting:
            rows = np.concatenate([plan.logit_rows(r) for r in decoding] + [np.zeros(0, int)])
            parts = [_rows_of(out.logits, rows)] if decoding else []
            parts += [self._first_logits(r, plan, out) for r in starting]
            # decode logits stay where the graph wrote them; first logits (host) join them there
            xp = arrays.module_of(parts[0])
            logits = parts[0] if len(parts) == 1 else xp.concatenate([xp.asarray(p) for p in parts])
            mixed.tokens = self._mix_tokens([*decoding, *starting], logits)
        for r in plan.decoding:
            if isinstance(r, SequenceRequest):  # beam search runs on the host: a counted copy
                beams = arrays.to_host(_rows_of(out.logits, plan.logit_rows(r)))
                mixed.beams[id(r)] = log_softmax(beams)  # beams x V
        for r in plan.starting:
            if isinstance(r, SequenceRequest):
                mixed.beams[id(r)] = log_softmax(self._first_logits(r, plan, out))
        return mixed

    def _first_logits(self, r: Request, plan: StepPlan, out: ForwardOutput) -> np.ndarray:
        """The logits after each prompt row's last token: this chunk's, or an earlier chunk's."""
        assert out.chunk is not None
        at = {id(row): i for i, row in enumerate(plan.chunk.rows)}
        rows = []
        for row in r.prefill:
            i = at.get(id(row))
            last = None if i is None else out.chunk.logits[i, len(out.chunk.wanted[i]) - 1]
            rows.append(row.logits if last is None else last)
        return np.stack(rows)

    def _mix_tokens(self, reqs: list[TokenRequest], logits: np.ndarray) -> dict[int, tuple]:
        """The mixture kernel over every RAG-Token and Concat request of the step, in one call
        (logits: their rows in order, ours to write: EOS masking writes into them)."""
        offsets = np.zeros(len(reqs) + 1, np.int64)
        np.cumsum([r.rows or len(r.prefill) for r in reqs], out=offsets[1:])
        eos = arrays.like(logits, self.eos)
        for g, r in enumerate(reqs):  # min_new_tokens: no EOS yet, in any passage's distribution
            if len(r.tokens) < r.decoding.min_new_tokens:
                logits[offsets[g] : offsets[g + 1], eos] = -np.inf
        res = kernels.mixture_step(
            logits,
            np.concatenate([r.log_prior for r in reqs]),
            offsets,
            np.array([r.decoding.temperature for r in reqs], np.float32),
            np.array([r.decoding.top_k for r in reqs], np.int32),
            np.array([r.decoding.top_p for r in reqs], np.float32),
            np.array([r.draw() for r in reqs], np.float64),
            max(r.decoding.top_n for r in reqs),
        )
        out = {}
        for g, r in enumerate(reqs):
            a, b, n = offsets[g], offsets[g + 1], r.decoding.top_n
            top = [
                (i, "", lp)  # the front door detokenises alternatives, off this thread
                for i, lp in zip(
                    res.top_ids[g, :n].tolist(), res.top_logprobs[g, :n].tolist(), strict=True
                )
                if i >= 0
            ]
            out[id(r)] = (
                int(res.token[g]),
                float(res.logprob[g]),
                res.responsibility[a:b],
                res.row_logprob[a:b],
                top,
            )
        return out

    # ----------------------------------------------------------------- 4. update

    def _update(self, plan: StepPlan, out: ForwardOutput, mixed: Mixed) -> None:
        if plan.decoding:
            self.batch.append()
        if out.chunk is not None:
            commit_chunk(plan.chunk, out.chunk, self.passage_cache)
        freed: list[int] = []  # decode rows of requests that left (or beams that ended)
        for r in plan.decoding:
            before = list(r.slots)
            self._guarded(r, self._advance_decode, r, mixed)
            freed += before[r.rows :] if r.rows else before
        joining: list[tuple[Request, list[kv.Pieces], list[int], list[int]]] = []  # (request,
        # KV, next tokens, sources) of the rows that start decoding
        for r in plan.starting:
            r.prefill_done(time.perf_counter())
            new = self._guarded(r, self._advance_start, r, mixed)
            if new:
                joining.append((r, *new))
        for r in list(self.running):
            if r.prefill and r.prefilled and not r.rows and r not in plan.starting:
                self._guarded(r, self._finish_prefill_only, r)
        self._free(freed)
        for r, kvs, tokens, sources in joining:
            r.slots = self.batch.add(kvs, tokens, sources)
        for r in plan.requests:
            r.flush()

    def _guarded(self, r: Request, fn: Callable, *args):
        """Run one request's update; if it raises, only that request ends (with the error)."""
        try:
            return fn(*args)
        except Exception as e:
            LOG.exception("request %s failed in the update phase", r.id)
            r.slots = []  # its rows are freed by the update, with the others that left
            self._end(r, e)
            return None

    def _advance_decode(self, r: Request, mixed: Mixed) -> None:
        """One decoding request's step: feed its rows their next tokens, move its beams, or
        give up its rows (its first r.rows slots stay; the caller frees the rest)."""
        if isinstance(r, SequenceRequest):
            parents, tokens = r.advance(mixed.beams[id(r)], self.eos)
            if r.beams_done():
                self._beams_finished(r)
                return
            slots = np.asarray(r.slots, np.int64)
            keep = slots[: len(parents)]  # beams never widen after their first step
            self.batch.move(keep, slots[parents])
            self.batch.last[keep] = tokens
            r.slots = keep.tolist()
            return
        token, *results = mixed.tokens[id(r)]
        if self._on_token(r, token, *results):
            return
        self.batch.last[r.slots] = token

    def _advance_start(
        self, r: Request, mixed: Mixed
    ) -> tuple[list[kv.Pieces], list[int], list[int]] | None:
        """A request's first step after its prompts: the rows (KV, next token, source) it adds."""
        kvs = [row.kv for row in r.prefill]
        sources = [row.source for row in r.prefill]
        r.prefill = []
        if isinstance(r, SequenceRequest):
            r.prompt_kv = kvs if r.thorough else []
            r.row_beam = list(range(len(r.beams)))
            parents, tokens = r.advance(mixed.beams[id(r)], self.eos)
            if r.beams_done():
                self._beams_finished(r)
                return None
            return [kvs[p] for p in parents], tokens, [sources[p] for p in parents]
        token, *results = mixed.tokens[id(r)]
        if self._on_token(r, token, *results):
            return None
        return kvs, [token] * len(kvs), sources

    def _on_token(self, r: TokenRequest, token: int, *results) -> bool:
        previous = r.last_token_time
        finished = r.on_token(token, *results)
        if len(r.tokens) == 1:
            self.observer.on_first_token(r.first_token - r.arrival)
        else:
            self.observer.on_inter_token(r.last_token_time - previous)
        if finished:
            self._finish(r, r.finish_reason)
        return finished

    def _beams_finished(self, r: SequenceRequest) -> None:
        """Beams done: rescore as prefill rows ("thorough"), or answer now ("fast")."""
        r.slots = []
        if r.thorough:
            r.prefill = r.rescoring_prefill()
            r.prompt_kv = []  # the rescoring rows hold what they need
        if not r.prefill:  # "fast", or every candidate came from every passage's own beams (K = 1)
            self._answer_sequence(r)

    def _answer_sequence(self, r: SequenceRequest) -> None:
        r.stream_answer(r.answer())
        self._finish(r, r.finish_reason)

    def _finish_prefill_only(self, r: Request) -> None:
        """Work whose last prefill rows just finished: Score, or RAG-Sequence rescoring."""
        if isinstance(r, ScoreRequest):
            r.prefill_done(time.perf_counter())
            r.outbox.append(r.result())
            self._finish(r, "scored")
        elif isinstance(r, SequenceRequest):
            self._answer_sequence(r)

    def _free(self, slots: list[int]) -> None:
        """Give rows back to the batch; the rows moved into the holes get their new slots."""
        if not slots:
            return
        moved = self.batch.free(slots)
        if moved:
            for r in self.running:
                if r.slots:
                    r.slots = [moved.get(s, s) for s in r.slots]

    # ----------------------------------------------------------------- endings

    def _isolate(self, plan: StepPlan, err: Exception) -> None:
        """The step raised: run each request's rows alone; those that raise alone end with their
        error, the rest go on next step (this step is thrown away: nothing was written)."""
        culprits = []
        for r in plan.requests:
            probe = plan.only(r)
            try:
                self._mix(probe, self._forward(probe))
            except Exception as e:
                culprits.append((r, e))
        if not culprits:  # no single request fails: the step itself does
            culprits = [(r, err) for r in plan.requests]
        for r, e in culprits:
            LOG.error("request %s failed in the step: %r", r.id, e, exc_info=e)
            self._end(r, e)

    def _end(self, r: Request, err: BaseException) -> None:
        """End a request with an error status (after whatever it streamed before)."""
        r.outbox.append(err)
        r.flush()
        self._retire(r)
        self.observer.on_finish("error", len(getattr(r, "tokens", ())))

    def _finish(self, r: Request, reason: str) -> None:
        """A request that ended well; its decode rows, if any, are freed by the caller."""
        self.observer.on_finish(reason, len(getattr(r, "tokens", ())))
        r.prefill, r.slots = [], []
        if r in self.running:
            self.running.remove(r)

    def _retire(self, r: Request) -> None:
        """Take a request out of the running batch (its rows) and out of `running`."""
        if r not in self.running:
            return
        slots, r.slots, r.prefill = r.slots, [], []
        self.running.remove(r)
        self._free(slots)

    def _report_queue(self) -> None:
        self.observer.on_queue(len(self.scheduler.waiting), len(self.running), self.batch.rows)


def _rows_of(logits: Any, rows: np.ndarray) -> Any:
    """logits[rows]: a view when the rows are consecutive (the usual case), else a copy (on the
    logits' own device)."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size and np.all(np.diff(rows) == 1):
        return logits[rows[0] : rows[-1] + 1]
    return logits[arrays.like(logits, rows)]
