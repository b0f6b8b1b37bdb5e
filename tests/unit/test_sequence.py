"""RAG-Sequence decoding on the tiny real generator: beam search with a reordered KV cache, then
thorough and fast marginalisation.

References: a greedy loop that recomputes the whole row every step (no cache), and rescoring of
hypotheses through `continuation_logprobs` (one padded pass, no cache).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import row_logits

from ragmix.engine.prompts import PromptTemplate
from ragmix.engine.score import continuation_logprobs, passage_prompts
from ragmix.engine.sequence import beam_search, rag_sequence
from ragmix.errors import ValidationError
from ragmix.models.generator import Generator

QUESTION = "What is the capital of France?"
PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany; Rome is the capital of Italy."),
    ("", "The quick brown fox jumps over the lazy dog."),
]
LOG_PRIOR = np.log([0.5, 0.3, 0.2])
MAX_NEW = 6
MIN_GAP = 1e-4


@pytest.fixture(scope="module")
def gen(tiny_generator_dir) -> Generator:
    return Generator.load(tiny_generator_dir, threads=1)


@pytest.fixture(scope="module")
def template(gen) -> PromptTemplate:
    return PromptTemplate.parse(gen.prompt_template)


@pytest.fixture(scope="module")
def prompts(gen, template) -> list[list[int]]:
    return passage_prompts(gen, template, PASSAGES, QUESTION)


def greedy(gen: Generator, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Argmax loop recomputing the full row each step; returns tokens (EOS included) and log p."""
    seq, total = list(prompt), 0.0
    for _ in range(n):
        x = row_logits(gen, seq, [len(seq) - 1])[0].astype(np.float64)
        logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        top2 = np.sort(logp)[-2:]
        assert top2[1] - top2[0] > MIN_GAP, "greedy tie: choose other inputs"
        tok = int(np.argmax(logp))
        seq.append(tok)
        total += logp[tok]
        if tok in gen.eos_token_ids:
            break
    return seq[len(prompt) :], total


def test_one_beam_is_greedy(gen, prompts):
    for p, hyps in zip(prompts, beam_search(gen, prompts, 1, MAX_NEW), strict=True):
        ids, logprob = greedy(gen, p, MAX_NEW)
        assert len(hyps) == 1
        assert hyps[0].scored_ids == ids
        assert hyps[0].finished == (ids[-1] in gen.eos_token_ids)
        assert hyps[0].logprob == pytest.approx(logprob, abs=1e-4)


def test_beams_sorted_distinct_and_rescored_exactly(gen, prompts):
    beams = beam_search(gen, prompts, 4, MAX_NEW)
    for p, hyps in zip(prompts, beams, strict=True):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.scored_ids) for h in hyps}) == 4
        # A hypothesis' log-prob from the reordered KV cache equals a fresh pass over its tokens.
        fresh = continuation_logprobs(gen, [p] * 4, [h.scored_ids for h in hyps])
        for h, lp in zip(hyps, fresh, strict=True):
            assert len(h.token_logprobs) == len(h.scored_ids)
            assert h.logprob == pytest.approx(sum(h.token_logprobs), abs=1e-9)
            np.testing.assert_allclose(h.token_logprobs, lp, atol=5e-5)
            assert h.finished or len(h.ids) == MAX_NEW
    # Beams of several prompts batched together equal each prompt alone.
    alone = beam_search(gen, [prompts[1]], 4, MAX_NEW)[0]
    assert [h.scored_ids for h in alone] == [h.scored_ids for h in beams[1]]


def test_one_passage_thorough_is_the_best_beam_and_fast_agrees(gen, template, prompts):
    hyps = beam_search(gen, prompts[:1], 3, MAX_NEW)[0]
    best = max(hyps, key=lambda h: h.logprob)  # RAG-Sequence rescoring: no length normalisation
    answers = {
        mode: rag_sequence(
            gen,
            template,
            PASSAGES[:1],
            np.zeros(1),
            QUESTION,
            num_beams=3,
            max_new_tokens=MAX_NEW,
            mode=mode,
        )
        for mode in ("thorough", "fast")
    }
    for a in answers.values():
        assert a.ids == best.scored_ids
        assert a.logprob == pytest.approx(best.logprob, abs=1e-4)
        assert a.finish_reason == ("eos" if best.finished else "length")
        assert a.candidates == 3
        np.testing.assert_allclose(a.posterior, [1.0])
    np.testing.assert_allclose(
        answers["thorough"].token_logprobs, answers["fast"].token_logprobs, atol=1e-4
    )


@pytest.mark.parametrize("mode", ["thorough", "fast"])
def test_answer_invariants(gen, template, prompts, mode):
    a = rag_sequence(
        gen, template, PASSAGES, LOG_PRIOR, QUESTION, num_beams=3, max_new_tokens=MAX_NEW, mode=mode
    )
    n, k = len(a.ids), len(PASSAGES)
    assert a.token_logprobs.shape == (n,) and a.responsibilities.shape == (n, k)
    assert a.token_logprobs.sum() == pytest.approx(a.logprob, abs=1e-9)
    assert a.posterior.sum() == pytest.approx(1, abs=1e-9)
    np.testing.assert_allclose(a.responsibilities.sum(1), 1, atol=1e-9)
    np.testing.assert_allclose(a.responsibilities[-1], a.posterior, atol=1e-9)
    assert 1 <= a.candidates <= 3 * k
    assert (a.ids[-1] in gen.eos_token_ids) == (a.finish_reason == "eos")


def early_eos(gen: Generator, prompts: list[list[int]], monkeypatch) -> None:
    """Make a token the beams emit the EOS, so some hypotheses finish before max_new_tokens."""
    for tok in beam_search(gen, prompts[:1], 3, MAX_NEW)[0][0].ids[1:]:
        monkeypatch.setattr(gen, "eos_token_ids", frozenset({tok}))
        if any(h.finished for h in beam_search(gen, prompts, 3, MAX_NEW)[0]):
            return
    pytest.fail("no token of the best beam ends a hypothesis")


@pytest.mark.parametrize("eos", ["model", "early"])
def test_thorough_marginal_is_the_best_over_all_candidates(
    gen, template, prompts, eos, monkeypatch
):
    if eos == "early":
        early_eos(gen, prompts, monkeypatch)
    a = rag_sequence(
        gen, template, PASSAGES, LOG_PRIOR, QUESTION, num_beams=3, max_new_tokens=MAX_NEW
    )
    candidates = {
        tuple(h.scored_ids) for hyps in beam_search(gen, prompts, 3, MAX_NEW) for h in hyps
    }
    assert a.candidates == len(candidates)
    marginals = {}
    for c in candidates:
        lp = continuation_logprobs(gen, prompts, [list(c)] * len(prompts))
        marginals[c] = np.logaddexp.reduce(LOG_PRIOR + np.array([x.sum() for x in lp]))
    assert a.logprob == pytest.approx(marginals[tuple(a.ids)], abs=1e-4)
    assert a.logprob >= max(marginals.values()) - 1e-4
    if eos == "early":  # finished candidates are scored with their EOS, as HF does
        assert any(c[-1] in gen.eos_token_ids for c in candidates)


def test_fast_counts_zero_where_a_beam_lacks_the_candidate(gen, template, prompts):
    a = rag_sequence(
        gen,
        template,
        PASSAGES,
        LOG_PRIOR,
        QUESTION,
        num_beams=2,
        max_new_tokens=MAX_NEW,
        mode="fast",
    )
    beams = beam_search(gen, prompts, 2, MAX_NEW)
    producers = {
        j: h for j, hyps in enumerate(beams) for h in hyps if h.scored_ids == a.ids
    }  # passage -> its hypothesis equal to the answer
    assert producers
    want = np.logaddexp.reduce([LOG_PRIOR[j] + h.logprob for j, h in producers.items()])
    assert a.logprob == pytest.approx(want, abs=1e-9)
    for j in range(len(PASSAGES)):
        assert (a.posterior[j] > 0) == (j in producers)


def test_zero_prior_passage_and_errors(gen, template):
    with np.errstate(divide="ignore"):
        log_prior = np.log([0.0, 1.0, 0.0])
    a = rag_sequence(
        gen, template, PASSAGES, log_prior, QUESTION, num_beams=2, max_new_tokens=MAX_NEW
    )
    np.testing.assert_allclose(a.posterior, [0.0, 1.0, 0.0])
    alone = rag_sequence(
        gen, template, PASSAGES[1:2], np.zeros(1), QUESTION, num_beams=2, max_new_tokens=MAX_NEW
    )
    assert a.ids == alone.ids and a.logprob == pytest.approx(alone.logprob, abs=1e-9)
    with pytest.raises(ValidationError, match="mode"):
        rag_sequence(gen, template, PASSAGES, LOG_PRIOR, QUESTION, num_beams=2, max_new_tokens=4,
                     mode="slow")  # fmt: skip
    with pytest.raises(ValidationError, match="num_beams"):
        beam_search(gen, [[1, 2]], 0, 4)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        beam_search(gen, [[1, 2]], 2, gen.max_positions)
