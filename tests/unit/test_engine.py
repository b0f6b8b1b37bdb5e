"""The engine's token loop against an independent RAG-Token loop, on tiny real bundles.

The reference recomputes every passage prompt from scratch at every step (no KV cache, no batching,
no Numba): log_softmax per passage + log prior, logsumexp over passages, argmax. The engine must
produce the same tokens, and concurrent requests the same answers as one at a time.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import make_engine, row_logits

from ragmix.engine.outputs import DoneEvent, FinishReason, PassagesEvent, TokenEvent
from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams
from ragmix.engine.prompts import PromptTemplate, passage_text, tokenize_prompt
from ragmix.errors import NotFoundError, OverloadedError, ValidationError
from ragmix.models.generator import Generator

QUESTIONS = [
    "What does the yield statement do?",
    "How does a for loop work?",
    "What happens on import?",
    "How are exceptions handled with try?",
]


@pytest.fixture(scope="module")
def parts(tiny_parts):
    return tiny_parts


@pytest.fixture(scope="module")
def engine(parts):
    e = make_engine(parts)
    yield e
    e.shutdown()


async def collect(engine, query, *, k=3, n=10, mixture=Mixture.TOKEN, ids=(), **dec):
    events = []
    retrieval = RetrievalParams(query, top_k=k, passage_ids=list(ids))
    async for ev in engine.generate(retrieval, DecodingParams(max_new_tokens=n, **dec), mixture):
        events.append(ev)
    return events


def reference_greedy(gen: Generator, prompts: list[list[int]], log_prior: np.ndarray, n: int):
    """Independent RAG-Token greedy loop: full recompute per passage, per step."""
    seqs = [list(p) for p in prompts]
    out, logprobs = [], []
    for _ in range(n):
        rows = []
        for s in seqs:
            x = row_logits(gen, s, [len(s) - 1])[0].astype(np.float64)
            rows.append(x - (x.max() + np.log(np.exp(x - x.max()).sum())))  # log_softmax
        mix = np.logaddexp.reduce(np.stack(rows) + log_prior[:, None], axis=0)  # V
        tok = int(np.argmax(mix))
        out.append(tok)
        logprobs.append(mix[tok])
        if tok in gen.eos_token_ids:
            break
        for s in seqs:
            s.append(tok)
    return out, logprobs


def test_token_mixture_matches_independent_reference(engine, parts):
    gen = parts[0]
    events = asyncio.run(collect(engine, QUESTIONS[0], k=3, n=10))
    passages = events[0]
    assert isinstance(passages, PassagesEvent) and len(passages.passages) == 3
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent)

    tpl = PromptTemplate.parse(gen.prompt_template)
    prompts = [
        tokenize_prompt(tpl, gen.encode, passage_text(p.title, p.text), QUESTIONS[0]).ids
        for p in passages.passages
    ]
    log_prior = np.log([p.prior for p in passages.passages])
    ref_tokens, ref_logprobs = reference_greedy(gen, prompts, log_prior, 10)
    assert [t.id for t in tokens] == ref_tokens
    np.testing.assert_allclose([t.logprob for t in tokens], ref_logprobs, atol=1e-4)
    for t in tokens:
        assert len(t.responsibilities) == 3
        assert abs(sum(t.responsibilities) - 1) <= 1e-5
    assert "".join(t.text for t in tokens) == done.text
    assert abs(sum(done.posterior) - 1) <= 1e-5
    assert done.usage.generated_tokens == len(tokens)
    assert done.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert done.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_concurrent_requests_equal_one_at_a_time(engine, parts):
    # Given passages: a query embedded in a batch may rank the tiny encoder's near-ties differently.
    ids = [[parts[2].passage(r).id for r in range(i, i + k)] for i, k in enumerate((1, 2, 3, 4))]
    alone = [asyncio.run(collect(engine, q, n=12, ids=i)) for q, i in zip(QUESTIONS, ids)]

    async def together():
        return await asyncio.gather(
            *(collect(engine, q, n=12, ids=i) for q, i in zip(QUESTIONS, ids))
        )

    for a, b in zip(alone, asyncio.run(together())):
        assert [e.id for e in a if isinstance(e, TokenEvent)] == [
            e.id for e in b if isinstance(e, TokenEvent)
        ]
        assert a[-1].text == b[-1].text


def test_concat_is_one_row_without_responsibilities(engine):
    events = asyncio.run(collect(engine, QUESTIONS[1], k=3, n=5, mixture=Mixture.CONCAT))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert tokens and all(t.responsibilities == [] for t in tokens)
    assert events[-1].posterior == []
    assert len(events[0].passages) == 3


def test_stop_string_ends_generation_and_is_not_returned(engine):
    free = asyncio.run(collect(engine, QUESTIONS[0], k=2, n=20))
    text = free[-1].text
    if len(text) < 4:
        pytest.skip("the tiny model ended too early to pick a stop string")
    stop = text[2:4]
    events = asyncio.run(collect(engine, QUESTIONS[0], k=2, n=20, stop=[stop]))
    done = events[-1]
    assert done.finish_reason == FinishReason.STOP
    assert done.text == text[: text.find(stop)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == done.text


def reference_sample(gen, prompts, log_prior, n, temperature, seed):
    """Independent sampled RAG-Token loop: full recompute per step, the reference kernel's sampling
    rule, one U(0,1) per token from default_rng(seed) (what the engine promises to draw)."""
    from ragmix.kernels import reference

    rng = np.random.default_rng(seed)
    seqs = [list(p) for p in prompts]
    out = []
    for _ in range(n):
        rows = []
        for s in seqs:
            rows.append(row_logits(gen, s, [len(s) - 1])[0])
        log_p_mix = np.logaddexp.reduce(reference.group_joint(np.stack(rows), log_prior), axis=0)
        ids, probs = reference.sampling_distribution(log_p_mix, temperature, 0, 1.0)
        tok = reference.draw(ids, probs, float(rng.random()))
        out.append(tok)
        if tok in gen.eos_token_ids:
            break
        for s in seqs:
            s.append(tok)
    return out


def test_seeded_sampling_draws_from_the_tempered_mixture(engine, parts):
    gen, idx = parts[0], parts[2]
    ids = [idx.passage(r).id for r in range(2)]
    tpl = PromptTemplate.parse(gen.prompt_template)
    runs = {}
    for t in (0.7, 1.5):
        a = asyncio.run(collect(engine, QUESTIONS[2], n=12, ids=ids, temperature=t, seed=7))
        b = asyncio.run(collect(engine, QUESTIONS[2], n=12, ids=ids, temperature=t, seed=7))
        got = [e.id for e in a if isinstance(e, TokenEvent)]
        assert got == [e.id for e in b if isinstance(e, TokenEvent)]  # reproducible
        passages = a[0].passages
        prompts = [
            tokenize_prompt(tpl, gen.encode, passage_text(p.title, p.text), QUESTIONS[2]).ids
            for p in passages
        ]
        log_prior = np.log([p.prior for p in passages])
        assert got == reference_sample(gen, prompts, log_prior, 12, t, 7)  # the tempered draw
        runs[t] = got
    assert runs[0.7] != runs[1.5]  # the same seed draws differently at another temperature


def test_given_passage_ids_skip_retrieval(engine, parts):
    idx = parts[2]
    ids = [idx.passage(0).id, idx.passage(1).id]

    async def run():
        return [
            ev
            async for ev in engine.generate(
                RetrievalParams(QUESTIONS[0], passage_ids=ids),
                DecodingParams(max_new_tokens=2),
                Mixture.TOKEN,
            )
        ]

    events = asyncio.run(run())
    assert [p.id for p in events[0].passages] == ids

    async def unknown():
        async for _ in engine.generate(
            RetrievalParams("q", passage_ids=["no-such:0"]), DecodingParams(), Mixture.TOKEN
        ):
            pass

    with pytest.raises(NotFoundError, match="no-such:0"):
        asyncio.run(unknown())


def test_cancel_frees_rows_at_the_next_step(engine):
    async def run():
        agen = engine.generate(
            RetrievalParams(QUESTIONS[3], top_k=4), DecodingParams(max_new_tokens=60), Mixture.TOKEN
        )
        async for ev in agen:
            if isinstance(ev, TokenEvent):
                break
        assert engine.core.batch.rows == 4
        await agen.aclose()
        for _ in range(200):
            if engine.core.batch.rows == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(run())
    assert engine.in_flight == 0


def test_queue_limit_refuses_at_once(parts):
    e = make_engine(parts, max_concurrent_requests=1, max_queued_requests=0)
    try:

        async def run():
            first = e.generate(
                RetrievalParams(QUESTIONS[0], top_k=2),
                DecodingParams(max_new_tokens=60),
                Mixture.TOKEN,
            )
            async for ev in first:
                if isinstance(ev, TokenEvent):
                    break
            with pytest.raises(OverloadedError, match="max_queued_requests=0"):
                await collect(e, QUESTIONS[1])
            await first.aclose()

        asyncio.run(run())
    finally:
        e.shutdown()


def test_prompt_longer_than_context_is_refused(engine, parts):
    query = "€" * 1990  # under max_query_chars, but ~6000 byte-level tokens
    assert len(parts[0].encode(query)) + 64 > parts[0].max_positions
    with pytest.raises(ValidationError, match="context"):
        asyncio.run(collect(engine, query, n=64))


def test_sequence_mixture_streams_the_marginalised_answer(engine, parts):
    from ragmix.engine.sequence import rag_sequence

    gen = parts[0]
    events = asyncio.run(
        collect(engine, QUESTIONS[0], k=3, n=8, mixture=Mixture.SEQUENCE, num_beams=2)
    )
    passages, done = events[0].passages, events[-1]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    tpl = PromptTemplate.parse(gen.prompt_template)
    direct = rag_sequence(
        gen,
        tpl,
        [(p.title, p.text) for p in passages],
        np.log([p.prior for p in passages]),
        QUESTIONS[0],
        num_beams=2,
        max_new_tokens=8,
    )
    assert [t.id for t in tokens] == direct.ids
    np.testing.assert_allclose(sum(t.logprob for t in tokens), direct.logprob, atol=1e-4)
    for t in tokens:
        assert len(t.responsibilities) == 3 and abs(sum(t.responsibilities) - 1) <= 1e-5
    np.testing.assert_allclose(done.posterior, direct.posterior, atol=1e-6)
    np.testing.assert_allclose(tokens[-1].responsibilities, done.posterior, atol=1e-5)
    assert "".join(t.text for t in tokens) == done.text


def test_score_reproduces_streamed_token_logprobs(engine, parts):
    # Score re-tokenises the answer text, so take the longest streamed prefix whose text
    # round-trips to the same ids (random-weight models often emit token sequences that BPE would
    # merge differently); a prefix is scored exactly as the whole (causality).
    gen = parts[0]
    candidates = [*QUESTIONS, "What does return give back?", "When does if run its body?"]
    ids = [parts[2].passage(r).id for r in range(3)]  # given: the tiny encoder's ranking can flip
    for question in candidates:
        events = asyncio.run(collect(engine, question, n=10, ids=ids))
        streamed = [e for e in events if isinstance(e, TokenEvent)]
        streamed = [e for e in streamed if e.id not in gen.eos_token_ids]
        for k in range(len(streamed), 2, -1):
            tokens = streamed[:k]
            text = "".join(t.text for t in tokens)
            if gen.encode(text) == [t.id for t in tokens]:
                break
        else:
            continue
        break
    else:
        raise AssertionError("no streamed prefix of 3+ tokens round-trips the tiny tokenizer")
    ids = [p.id for p in events[0].passages]
    _, result = asyncio.run(engine.score(RetrievalParams(question, passage_ids=ids), text))
    assert result.answer_ids == [t.id for t in tokens]
    np.testing.assert_allclose(result.token.token_logprobs, [t.logprob for t in tokens], atol=1e-4)
    np.testing.assert_allclose(
        result.token.responsibilities, [t.responsibilities for t in tokens], atol=1e-4
    )
    for m in (result.token, result.sequence):
        assert abs(m.posterior.sum() - 1) <= 1e-5
        np.testing.assert_allclose(m.token_logprobs.sum(), m.logprob, atol=1e-4)
    assert result.concat.posterior.size == 0


def test_score_with_one_passage_token_equals_sequence(engine):
    _, result = asyncio.run(
        engine.score(RetrievalParams(QUESTIONS[2], top_k=1), "It loads a module.")
    )
    np.testing.assert_allclose(result.token.logprob, result.sequence.logprob, atol=1e-5)
    with pytest.raises(ValidationError, match="answer"):
        asyncio.run(engine.score(RetrievalParams(QUESTIONS[2]), "  "))


def test_top_n_alternatives_lead_with_the_greedy_token(engine):
    events = asyncio.run(collect(engine, QUESTIONS[0], k=2, n=4, top_n=3))
    for t in (e for e in events if isinstance(e, TokenEvent)):
        assert len(t.top) == 3
        assert t.top[0][0] == t.id
        np.testing.assert_allclose(t.top[0][2], t.logprob, atol=1e-6)
        assert t.top[0][2] >= t.top[1][2] >= t.top[2][2]


def test_kv_budget_holds_back_admission_and_refuses_what_cannot_fit(parts):
    from ragmix.engine.observer import EngineObserver

    class Rows(EngineObserver):
        peak = 0

        def on_step(self, rows, requests, seconds):
            Rows.peak = max(Rows.peak, rows)

    # Given passages (the tiny encoder's ranking of near-equal scores is not stable), and a budget
    # with room for one 2-row request and 8 new tokens, not for two at once.
    gen, idx = parts[0], parts[2]
    ids = [idx.passage(r).id for r in range(4)]
    tpl = PromptTemplate.parse(gen.prompt_template)
    longest = max(
        len(tokenize_prompt(tpl, gen.encode, passage_text(p.title, p.text), q).ids)
        for p in map(idx.passage, range(2))
        for q in QUESTIONS[:2]
    )
    e = make_engine(parts, observer=Rows(), max_batch_tokens=2 * (longest + 8) + 10)
    try:

        async def both():
            return await asyncio.gather(
                collect(e, QUESTIONS[0], n=8, ids=ids[:2]),
                collect(e, QUESTIONS[1], n=8, ids=ids[:2]),
            )

        a, b = asyncio.run(both())
        assert a[-1].usage.generated_tokens and b[-1].usage.generated_tokens
        assert Rows.peak == 2
        with pytest.raises(ValidationError, match="max-batch-tokens"):
            asyncio.run(collect(e, QUESTIONS[0], n=8, ids=ids))
    finally:
        e.shutdown()


def test_min_new_tokens_keeps_eos_out(engine, parts):
    eos = parts[0].eos_token_ids

    async def runs(min_new):
        return await asyncio.gather(
            *(
                collect(engine, QUESTIONS[i % 4], k=1, n=48, temperature=100.0, seed=i,
                        min_new_tokens=min_new)
                for i in range(60)
            )
        )  # fmt: skip

    def eos_seen(results):
        return sum(any(e.id in eos for e in r if isinstance(e, TokenEvent)) for r in results)

    # Near-uniform sampling over the tiny vocabulary meets EOS somewhere in 60 x 48 draws (the
    # chance it does not is below 1e-3), unless min_new_tokens forbids it.
    assert eos_seen(asyncio.run(runs(0))) > 0
    constrained = asyncio.run(runs(48))
    assert eos_seen(constrained) == 0
    assert all(r[-1].finish_reason == FinishReason.LENGTH for r in constrained)
    with pytest.raises(ValidationError, match="min_new_tokens"):
        asyncio.run(collect(engine, QUESTIONS[0], n=4, min_new_tokens=5))


def test_sequence_reports_ranked_candidates(engine):
    events = asyncio.run(
        collect(
            engine, QUESTIONS[2], k=3, n=6, mixture=Mixture.SEQUENCE, num_beams=3,
            num_return_sequences=3,
        )
    )  # fmt: skip
    done = events[-1]
    assert 1 <= len(done.sequences) <= 3
    best = done.sequences[0]
    assert best.text == done.text or done.finish_reason == FinishReason.STOP
    assert best.token_ids == [e.id for e in events if isinstance(e, TokenEvent)]
    np.testing.assert_allclose(best.posterior, done.posterior, atol=1e-6)
    logprobs = [c.logprob for c in done.sequences]
    assert logprobs == sorted(logprobs, reverse=True)
    assert len({tuple(c.token_ids) for c in done.sequences}) == len(done.sequences)
    for c in done.sequences:
        assert abs(sum(c.posterior) - 1) <= 1e-5
