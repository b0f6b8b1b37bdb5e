"""The engine core's guarantees, on the tiny real bundles: nothing stranded, a failure stays with the
request that caused it, refusals before the first event, chunked prefill exact, every kind of
request in the same steps.

Overlaps between requests are made by a step gate (the engine waits until the test lets it go),
never by timing, so the tests mean the same on any machine.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conftest import make_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from ragmix import kernels
from ragmix.engine import kv
from ragmix.engine.observer import EngineObserver
from ragmix.engine.outputs import DoneEvent, PassagesEvent, TokenEvent
from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams
from ragmix.engine.prefill import LOGITS_PER_TOKEN, PrefillRow, plan_chunk
from ragmix.engine.prompts import PromptTemplate, passage_text, tokenize_prompt
from ragmix.engine.score import score_answer
from ragmix.engine.sequence import rag_sequence
from ragmix.errors import ValidationError

QUESTION = "What does the yield statement do?"
POISON_QUESTION = "Zebra quagga okapi?"


@pytest.fixture(scope="module")
def parts(tiny_parts):
    return tiny_parts


@pytest.fixture(scope="module")
def ids(parts):
    return [parts[2].passage(r).id for r in range(6)]


class Gate:
    """A step gate: the engine waits before every step until `open()`; then it runs freely."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def __call__(self, running) -> None:
        self.opened.wait()

    def open(self) -> None:
        self.opened.set()


class HoldAfterFirstToken(Gate):
    """The engine runs until some request has a token, then waits until `open()`."""

    def __call__(self, running) -> None:
        if any(getattr(r, "tokens", None) for r in running if not r.cancelled):
            self.opened.wait()


class Poisoned:
    """The tiny generator, except that a prefill pass containing `token` raises."""

    def __init__(self, generator, token: int) -> None:
        self._generator, self.token = generator, token

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def forward(self, input_ids, *args):
        if input_ids.shape[1] > 1 and (input_ids == self.token).any():
            raise RuntimeError("poisoned prefill")
        return self._generator.forward(input_ids, *args)


def retrieval(query: str, ids: list[str]) -> RetrievalParams:
    return RetrievalParams(query, passage_ids=list(ids))


async def collect(engine, query, ids, mixture=Mixture.TOKEN, **dec):
    dec.setdefault("max_new_tokens", 12)
    return [
        ev async for ev in engine.generate(retrieval(query, ids), DecodingParams(**dec), mixture)
    ]


def token_ids(events) -> list[int]:
    return [e.id for e in events if isinstance(e, TokenEvent)]


async def outcome(coro):
    """The events, or the exception the stream ended with."""
    try:
        return await coro
    except Exception as e:
        return e


def together(e, gate: Gate, *coros):
    """Each coroutine's outcome, their requests all queued before the gate lets the engine step."""

    async def run():
        tasks = [asyncio.ensure_future(outcome(c)) for c in coros]
        while e.core.in_flight < len(coros):  # a condition, not a timeout
            await asyncio.sleep(0.01)
        gate.open()
        return [await t for t in tasks]

    return asyncio.run(run())


def answer_alone(parts, query, ids, **dec):
    """The events of one request on an engine of its own."""
    e = make_engine(parts)
    try:
        return asyncio.run(collect(e, query, ids, **dec))
    finally:
        e.shutdown()


def poison_token(parts, ids) -> int:
    """A token of POISON_QUESTION's prompt that the normal request's prompts never contain."""
    gen, idx = parts[0], parts[2]
    tpl = PromptTemplate.parse(gen.prompt_template)
    normal = set()
    for pid in ids:
        p = idx.passage(idx.rows_of([pid])[0])
        normal |= set(tokenize_prompt(tpl, gen.encode, passage_text(p.title, p.text), QUESTION).ids)
    candidates = [t for t in gen.encode(POISON_QUESTION) if t not in normal]
    assert candidates, "the poison question shares every token with the normal prompts"
    return candidates[0]


def test_a_failing_prefill_ends_only_its_request_and_strands_nothing(parts, ids):
    """Defects 1 and 5: both requests are admitted in the same step; one's prefill raises."""
    alone = answer_alone(parts, QUESTION, ids[:3], max_new_tokens=20)
    gate = Gate()
    e = make_engine(parts, step_gate=gate)
    e.core.generator = Poisoned(parts[0], poison_token(parts, ids[:3]))
    try:
        normal, bad = together(
            e,
            gate,
            collect(e, QUESTION, ids[:3], max_new_tokens=20),
            collect(e, POISON_QUESTION, ids[:3]),
        )
        assert isinstance(bad, RuntimeError) and "poisoned prefill" in str(bad)
        assert isinstance(normal, list) and isinstance(normal[-1], DoneEvent)
        assert token_ids(normal) == token_ids(alone)
        assert e.in_flight == 0 and e.core.batch.rows == 0
    finally:
        e.shutdown()


def test_a_failing_prefill_beside_a_decoding_stream_leaves_the_stream_alone(parts, ids):
    """The decode rows of one request and the prefill chunk of another are one step; the chunk
    raises: the decoding stream goes on to the same answer it gets alone."""
    alone = answer_alone(parts, QUESTION, ids[:3], max_new_tokens=20)
    gate = HoldAfterFirstToken()
    e = make_engine(parts, step_gate=gate)
    try:
        e.core.generator = Poisoned(parts[0], poison_token(parts, ids[:3]))

        async def both():
            normal = asyncio.ensure_future(
                outcome(collect(e, QUESTION, ids[:3], max_new_tokens=20))
            )
            while not e.core.running or not e.core.running[0].tokens:  # decoding, then held
                await asyncio.sleep(0.01)
            bad = asyncio.ensure_future(outcome(collect(e, POISON_QUESTION, ids[3:5])))
            while e.core.in_flight < 2:
                await asyncio.sleep(0.01)
            gate.open()
            return await normal, await bad

        normal, bad = asyncio.run(both())
        assert isinstance(bad, RuntimeError)
        assert token_ids(normal) == token_ids(alone)
        assert e.in_flight == 0
    finally:
        e.shutdown()


def test_a_failing_mixture_ends_only_the_request_whose_rows_raise(parts, ids, monkeypatch):
    """A kernel failure caused by one request's parameters ends that request only."""
    real = kernels.mixture_step

    def mixture_step(logits, log_prior, offsets, temperature, *rest):
        if np.any(np.isclose(temperature, 0.625)):
            raise FloatingPointError("poisoned temperature")
        return real(logits, log_prior, offsets, temperature, *rest)

    alone = answer_alone(parts, QUESTION, ids[:2], max_new_tokens=16)
    gate = Gate()
    e = make_engine(parts, step_gate=gate)
    try:
        monkeypatch.setattr(kernels, "mixture_step", mixture_step)

        normal, bad = together(
            e,
            gate,
            collect(e, QUESTION, ids[:2], max_new_tokens=16),
            collect(e, QUESTION, ids[2:4], temperature=0.625, seed=1),
        )
        assert isinstance(bad, FloatingPointError)
        assert token_ids(normal) == token_ids(alone)
        assert e.in_flight == 0
    finally:
        e.shutdown()


def test_a_failing_update_ends_only_its_request(parts, ids, monkeypatch):
    """A request whose own bookkeeping raises mid-stream (after two tokens) ends with the error;
    the request decoding beside it keeps its rows and its answer."""
    from ragmix.engine.request import TokenRequest

    alone = answer_alone(parts, QUESTION, ids[:2], max_new_tokens=16)
    real = TokenRequest.on_token

    def on_token(self, token, *rest):
        if self.decoding.top_k == 7 and len(self.tokens) == 2:
            raise ArithmeticError("poisoned bookkeeping")
        return real(self, token, *rest)

    monkeypatch.setattr(TokenRequest, "on_token", on_token)
    gate = Gate()
    e = make_engine(parts, step_gate=gate)
    try:
        normal, bad = together(
            e,
            gate,
            collect(e, QUESTION, ids[:2], max_new_tokens=16),
            collect(e, POISON_QUESTION, ids[2:4], top_k=7),
        )
        assert isinstance(bad, ArithmeticError)
        assert token_ids(normal) == token_ids(alone)
        assert e.in_flight == 0 and e.core.batch.rows == 0
    finally:
        e.shutdown()


def test_everything_refusable_is_refused_before_the_first_event(parts, ids):
    """Defect 2: the KV budget, the batch's rows and the context are checked before `passages`."""
    e = make_engine(parts, max_batch_tokens=200, max_batch_rows=20)
    try:

        async def first_event(mixture=Mixture.TOKEN, **dec):
            stream = e.generate(retrieval(QUESTION, ids[:4]), DecodingParams(**dec), mixture)
            try:
                return await stream.__anext__()
            finally:
                await stream.aclose()

        with pytest.raises(ValidationError, match="max-batch-tokens"):
            asyncio.run(first_event(max_new_tokens=8))
        with pytest.raises(ValidationError, match="max_batch_rows") as err:
            asyncio.run(first_event(Mixture.SEQUENCE, max_new_tokens=8, num_beams=8))
        assert err.value.param == "num_beams"
        with pytest.raises(ValidationError, match="context"):
            long = RetrievalParams("€" * 1990, passage_ids=ids[:1])
            stream = e.generate(long, DecodingParams(max_new_tokens=8), Mixture.CONCAT)
            asyncio.run(stream.__anext__())
        assert e.in_flight == 0
    finally:
        e.shutdown()


@pytest.fixture(scope="module")
def chunky(parts):
    """An engine whose prefill chunks are 7 tokens: every prompt takes many steps."""
    e = make_engine(parts, max_prefill_tokens=7)
    yield e
    e.shutdown()


def test_chunked_prefill_gives_the_same_tokens(parts, ids, chunky):
    whole = make_engine(parts, passage_cache_bytes=0)
    try:
        for mixture in (Mixture.TOKEN, Mixture.CONCAT):
            expected = asyncio.run(collect(whole, QUESTION, ids[:3], mixture, max_new_tokens=10))
            for _ in range(2):  # cold, then from the passage cache
                got = asyncio.run(collect(chunky, QUESTION, ids[:3], mixture, max_new_tokens=10))
                assert token_ids(got) == token_ids(expected)
                np.testing.assert_allclose(
                    [t.logprob for t in got if isinstance(t, TokenEvent)],
                    [t.logprob for t in expected if isinstance(t, TokenEvent)],
                    atol=1e-4,
                )
        assert asyncio.run(collect(chunky, QUESTION, ids[:3]))[-1].usage.cached_prompt_tokens > 0
    finally:
        whole.shutdown()


@pytest.mark.parametrize("fast", [False, True])
def test_sequence_in_the_batch_equals_the_standalone_beam_search(parts, ids, chunky, fast):
    gen = parts[0]
    for _ in range(2):  # cold, then the prompts from the passage cache
        events = asyncio.run(
            collect(
                chunky, QUESTION, ids[:3], Mixture.SEQUENCE, max_new_tokens=6, num_beams=3,
                fast_sequence_decoding=fast, num_return_sequences=3,
            )
        )  # fmt: skip
        passages = events[0].passages
        direct = rag_sequence(
            gen,
            PromptTemplate.parse(gen.prompt_template),
            [(p.title, p.text) for p in passages],
            np.log([p.prior for p in passages]),
            QUESTION,
            num_beams=3,
            max_new_tokens=6,
            mode="fast" if fast else "thorough",
            num_return_sequences=3,
        )
        assert token_ids(events) == direct.ids
        done = events[-1]
        np.testing.assert_allclose(done.posterior, direct.posterior, atol=1e-5)
        assert [s.token_ids for s in done.sequences] == [r.ids for r in direct.ranked]
        np.testing.assert_allclose(
            [s.logprob for s in done.sequences], [r.logprob for r in direct.ranked], atol=1e-4
        )


def test_score_in_the_batch_equals_the_standalone_score(parts, ids, chunky):
    gen = parts[0]
    answer = "It returns a value from a generator."
    for _ in range(2):  # cold, then from the passage cache
        passages, got = asyncio.run(chunky.score(retrieval(QUESTION, ids[:3]), answer))
        direct = score_answer(
            gen,
            PromptTemplate.parse(gen.prompt_template),
            [(p.title, p.text) for p in passages],
            np.log([p.prior for p in passages]),
            QUESTION,
            answer,
        )
        assert got.answer_ids == direct.answer_ids
        for a, b in ((got.token, direct.token), (got.sequence, direct.sequence)):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
            np.testing.assert_allclose(a.posterior, b.posterior, atol=1e-5)
        np.testing.assert_allclose(got.concat.logprob, direct.concat.logprob, atol=1e-3)


class StepLog(EngineObserver):
    def __init__(self) -> None:
        self.requests: list[int] = []
        self.prefill_tokens: list[int] = []

    def on_step(self, rows, requests, seconds):
        self.requests.append(requests)

    def on_prefill(self, rows, tokens, cached_tokens, seconds):
        self.prefill_tokens.append(tokens)


def test_sequence_score_and_token_requests_share_every_step(parts, ids):
    """No whole-request job: while a RAG-Sequence request beams, a Score and a TOKEN stream run
    in the same steps, and no prefill pass carries more than max_prefill_tokens tokens."""
    log, gate = StepLog(), Gate()
    e = make_engine(parts, observer=log, step_gate=gate, max_prefill_tokens=128)
    try:

        async def all_three():
            seq = asyncio.ensure_future(
                collect(e, QUESTION, ids[:3], Mixture.SEQUENCE, max_new_tokens=8, num_beams=2)
            )
            tok = asyncio.ensure_future(
                collect(e, QUESTION, ids[3:5], max_new_tokens=24, min_new_tokens=24)
            )
            score = asyncio.ensure_future(e.score(retrieval(QUESTION, ids[:2]), "It yields."))
            while e.core.in_flight < 3:
                await asyncio.sleep(0.01)
            gate.open()
            return await seq, await tok, await score

        seq, tok, (_, scored) = asyncio.run(all_three())
        assert isinstance(seq[-1], DoneEvent) and isinstance(tok[-1], DoneEvent)
        assert np.isfinite(scored.token.logprob)
        assert max(log.requests) == 3  # one step carried rows of all three
        assert max(log.prefill_tokens) <= 128
    finally:
        e.shutdown()


def test_passages_event_comes_first_and_nothing_follows_done(parts, ids, chunky):
    events = asyncio.run(collect(chunky, QUESTION, ids[:2], max_new_tokens=5))
    assert isinstance(events[0], PassagesEvent) and isinstance(events[-1], DoneEvent)
    assert all(isinstance(e, TokenEvent) for e in events[1:-1])


@settings(max_examples=200, deadline=None)
@given(
    remaining=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    budget=st.integers(1, 600),
)
def test_plan_chunk_fits_the_budget_keeps_fifo_and_computes_the_most(remaining, budget):
    rows = [PrefillRow(list(range(n))) for n in remaining]
    chunk = plan_chunk(rows, budget)
    assert chunk.rows == rows[: len(chunk.rows)]  # a FIFO prefix
    assert chunk.rows and (chunk.cost <= budget or chunk.counts == [1])  # (1: progress)
    assert all(1 <= c <= r.remaining for r, c in zip(chunk.rows, chunk.counts))

    def useful(n: int) -> int:  # rows without a past and without scores: cost n * (w + 1/5)
        width = min(max(remaining[:n]), int((budget - n / LOGITS_PER_TOKEN) // n))
        return sum(min(r, width) for r in remaining[:n]) if width >= 1 else 0

    best = max(useful(n) for n in range(1, len(remaining) + 1))
    assert sum(chunk.counts) == max(best, 1)


def test_plan_chunk_charges_for_the_past_and_the_scored_logits(parts):
    gen = parts[0]
    _, b = kv.prefill(gen, [list(range(1, 300))])
    past = [kv.row_kv(b, 0)]
    plain = plan_chunk([PrefillRow(list(range(200))) for _ in range(4)], 256)
    long = plan_chunk([PrefillRow(list(range(200)), past) for _ in range(4)], 256)
    scored = plan_chunk([PrefillRow(list(range(200)), past, scored=199) for _ in range(4)], 256)
    assert sum(plain.counts) > sum(long.counts) > sum(scored.counts)
    for c in (plain, long, scored):
        assert c.cost <= 256


def test_running_batch_decodes_as_a_fresh_batch_through_leaves_joins_and_moves(parts):
    """Rows that leave, join (longer than the others), move (beams) and outgrow the slot capacity
    in place give the same logits as the plain batch that select() rebuilds each time."""
    from ragmix.engine.rows import RunningBatch

    gen = parts[0]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]
    _, fresh = kv.prefill(gen, prompts)
    fresh.last = np.arange(10, 15)
    rb = RunningBatch(gen, max_rows=8)
    assert rb.add([[kv.row_kv(fresh, i)] for i in range(4)], fresh.last[:4]) == [0, 1, 2, 3]
    ref = kv.select(fresh, np.arange(4))
    capacities = {rb.capacity}

    def step(tokens):
        a = kv.decode(gen, ref)
        b = rb.decode(gen)
        rb.append()
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_array_equal(rb.lengths, ref.lengths)
        ref.last[:] = tokens
        rb.last[:] = tokens
        capacities.add(rb.capacity)

    for t in range(3):
        step(np.arange(4) + 20 + t)
    moved = rb.free([1])  # the last row fills slot 1
    assert moved == {3: 1} and rb.rows == 3
    ref = kv.select(ref, np.array([0, 3, 2]))
    step(np.array([30, 31, 32]))
    _, long = kv.prefill(gen, [prompts[4] * 3])  # a row longer than every other joins
    assert rb.add([[kv.row_kv(long, 0)]], [40]) == [3]
    long.last = np.array([40])
    ref = _concat(ref, long)
    step(np.array([41, 42, 43, 44]))
    rb.move([0, 1], [2, 2])  # beams: rows 0 and 1 become copies of row 2
    ref = kv.select(ref, np.array([2, 2, 2, 3]))
    for t in range(70):  # past the slot capacity: reallocated, the rows' slots copied
        step(np.array([50, 51, 52, 53]) + t)
    assert len(capacities) > 1


def test_a_decode_probe_of_some_rows_writes_nothing(parts):
    """The isolation probe runs a subset of rows on copies: the batch's bytes stay as they were."""
    from ragmix.engine.rows import RunningBatch

    gen = parts[0]
    _, fresh = kv.prefill(gen, [[1, 2, 3], [4, 5]])
    rb = RunningBatch(gen, max_rows=4)
    rb.add([[kv.row_kv(fresh, i)] for i in range(2)], [7, 8])
    before = [a.copy() for a in rb._past]
    alone = rb.decode(gen, np.array([1]))
    np.testing.assert_allclose(alone[0], rb.decode(gen)[1], atol=1e-5)
    rb2 = [a.copy() for a in rb._past]
    for was, now in zip(before, rb2, strict=True):  # the full pass wrote slot `length` only
        assert (was[1, :, :2] == now[1, :, :2]).all()
    assert rb.lengths.tolist() == [3, 2]


def _concat(a, b):
    """The plain batch of a's rows then b's (the reference for a join)."""
    rows = [kv.row_kv(a, i) for i in range(a.rows)] + [kv.row_kv(b, i) for i in range(b.rows)]
    t = max(r[0].shape[2] for r in rows)
    out = kv.Batch(
        [np.zeros((len(rows), x.shape[1], t + kv.GROW, x.shape[3]), x.dtype) for x in a.past],
        np.concatenate([a.lengths, b.lengths]),
        np.concatenate([a.last, b.last]),
    )
    for i, row in enumerate(rows):
        kv.write_pieces(out.past, i, 0, [row])
    return out


@pytest.mark.parametrize("top_k", [1, 3])
def test_rag_sequence_finishes_when_no_candidate_needs_rescoring(parts, ids, top_k):
    """Found by fuzzing: with one passage (passage_ids or top_k = 1) every candidate is that
    passage's own, "thorough" has no rescoring rows, and the request waited forever for them."""
    e = make_engine(parts)
    try:

        async def both():
            one = await collect(e, QUESTION, ids[:1], Mixture.SEQUENCE, max_new_tokens=4)
            retrieved = [
                ev
                async for ev in e.generate(
                    RetrievalParams(QUESTION, top_k=top_k),
                    DecodingParams(max_new_tokens=4, num_beams=1),
                    Mixture.SEQUENCE,
                )
            ]
            fast = await collect(
                e,
                QUESTION,
                ids[:1],
                Mixture.SEQUENCE,
                max_new_tokens=4,
                fast_sequence_decoding=True,
            )
            return one, retrieved, fast

        one, retrieved, fast = asyncio.run(both())
    finally:
        e.shutdown()
    for events in (one, retrieved, fast):
        assert isinstance(events[0], PassagesEvent) and isinstance(events[-1], DoneEvent)
    assert token_ids(one) == token_ids(fast)  # one passage: thorough and fast agree
    assert one[-1].posterior == pytest.approx([1.0])


def test_a_request_cancelled_while_queued_is_counted_and_frees_its_place(parts, ids):
    """A cancelled request still waiting for admission leaves the queue at the next step, with a
    log line and a `cancelled` finish, like a running one (it used to vanish unrecorded)."""

    class Finishes(EngineObserver):
        def __init__(self) -> None:
            self.reasons: list[str] = []

        def on_finish(self, reason: str, generated_tokens: int) -> None:
            self.reasons.append(reason)

    observer, gate = Finishes(), HoldAfterFirstToken()
    e = make_engine(parts, observer=observer, step_gate=gate, max_concurrent_requests=1)
    try:

        async def run():
            running = asyncio.ensure_future(collect(e, QUESTION, ids[:2], max_new_tokens=4))
            while not e.core.running:  # admitted: the gate holds it after its first token
                await asyncio.sleep(0.01)
            queued = e.generate(retrieval(QUESTION, ids[2:4]), DecodingParams(), Mixture.TOKEN)
            assert isinstance(await queued.__anext__(), PassagesEvent)
            assert len(e.core.scheduler.waiting) == 1
            await queued.aclose()  # the client goes away while it waits
            gate.open()
            return await running

        events = asyncio.run(run())
    finally:
        e.shutdown()
    assert isinstance(events[-1], DoneEvent)
    assert sorted(observer.reasons) == ["cancelled", "length"]
    assert not e.core.scheduler.waiting


def test_a_raising_step_gate_fails_the_requests_in_flight_and_the_loop_goes_on(parts, ids):
    """The CI hang of test_drain: a step gate (a hook on the engine thread) that raised once
    killed the engine thread, and every stream then waited for its deadline."""

    class RaisesOnce(Gate):
        raised = False

        def __call__(self, running) -> None:
            self.opened.wait()
            if not self.raised and any(getattr(r, "tokens", None) for r in running):
                self.raised = True  # a request is decoding: it is in flight, not queued
                raise ValueError("invalid literal for int() with base 10: ''")

    gate = RaisesOnce()
    e = make_engine(parts, step_gate=gate)
    try:
        (first,) = together(e, gate, collect(e, QUESTION, ids[:2]))
        assert isinstance(first, ValueError)
        assert e.core._thread.is_alive()
        after = asyncio.run(collect(e, QUESTION, ids[:2]))
        assert isinstance(after[-1], DoneEvent) and token_ids(after)
    finally:
        e.shutdown()
