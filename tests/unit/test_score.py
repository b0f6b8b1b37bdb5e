"""Score: the three mixtures of a given answer from one batched pass, on the tiny real generator.

The reference for every per-passage log-prob is an unpadded single-row pass with no batching.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import row_logits

from ragmix.engine import score
from ragmix.engine.prompts import PromptTemplate, concat_text, tokenize_prompt
from ragmix.engine.score import continuation_logprobs, passage_prompts, score_answer
from ragmix.errors import ValidationError
from ragmix.models.generator import Generator

QUESTION = "What is the capital of France?"
PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany; Rome is the capital of Italy."),
    ("", "The quick brown fox jumps over the lazy dog."),
]
ANSWER = "Paris is the capital."
LOG_PRIOR = np.log([0.5, 0.3, 0.2])


@pytest.fixture(scope="module")
def gen(tiny_generator_dir) -> Generator:
    return Generator.load(tiny_generator_dir, threads=1)


@pytest.fixture(scope="module")
def template(gen) -> PromptTemplate:
    return PromptTemplate.parse(gen.prompt_template)


def single_row_logprobs(gen: Generator, prompt: list[int], answer: list[int]) -> np.ndarray:
    """log p(answer_t | prompt, answer_<t) from one unpadded row: N."""
    index = range(len(prompt) - 1, len(prompt) - 1 + len(answer))
    x = row_logits(gen, prompt + answer, index).astype(np.float64)  # N x V
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return x[np.arange(len(answer)), answer] - lse


def reference_lp(gen, template, passages, answer_ids) -> np.ndarray:
    prompts = passage_prompts(gen, template, passages, QUESTION)
    return np.stack([single_row_logprobs(gen, p, answer_ids) for p in prompts])  # K x N


def test_batched_pass_equals_single_rows_with_ragged_lengths(gen, template, monkeypatch):
    prompts = passage_prompts(gen, template, PASSAGES, QUESTION)
    conts = [gen.encode("Paris is the capital."), gen.encode("Berlin"), [], gen.encode("a b c d e")]
    prompts.append(prompts[0])
    got = continuation_logprobs(gen, prompts, conts)
    for p, c, lp in zip(prompts, conts, got, strict=True):
        assert lp.shape == (len(c),)
        if c:
            np.testing.assert_allclose(lp, single_row_logprobs(gen, p, c), atol=2e-5)
    # A budget of one row per pass splits the batch; the numbers must not change.
    monkeypatch.setattr(score, "LOGITS_BUDGET_BYTES", 1)
    for a, b in zip(continuation_logprobs(gen, prompts, conts), got, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_mixtures_match_their_definitions(gen, template):
    r = score_answer(gen, template, PASSAGES, LOG_PRIOR, QUESTION, ANSWER)
    ids = r.answer_ids
    assert ids == gen.encode(ANSWER)
    lp = reference_lp(gen, template, PASSAGES, ids)  # K x N
    assert np.ptp(lp.sum(1)) > 0.5  # the passages matter
    joint = LOG_PRIOR[:, None] + lp  # K x N
    token = np.logaddexp.reduce(joint, axis=0)  # N
    np.testing.assert_allclose(r.token.token_logprobs, token, atol=5e-5)
    np.testing.assert_allclose(r.token.responsibilities, np.exp(joint - token).T, atol=5e-5)
    seq = np.logaddexp.reduce(LOG_PRIOR + lp.sum(1))
    assert r.sequence.logprob == pytest.approx(seq, abs=1e-4)
    posterior = np.exp(LOG_PRIOR + lp.sum(1) - seq)
    np.testing.assert_allclose(r.token.posterior, posterior, atol=5e-5)
    np.testing.assert_allclose(r.sequence.posterior, posterior, atol=5e-5)
    concat_prompt = tokenize_prompt(template, gen.encode, concat_text(PASSAGES), QUESTION).ids
    np.testing.assert_allclose(
        r.concat.token_logprobs, single_row_logprobs(gen, concat_prompt, ids), atol=2e-5
    )
    # TOKEN and SEQUENCE are different models: on several passages they differ.
    assert abs(r.token.logprob - r.sequence.logprob) > 1e-3


def test_invariants(gen, template):
    r = score_answer(gen, template, PASSAGES, LOG_PRIOR, QUESTION, ANSWER)
    n, k = len(r.answer_ids), len(PASSAGES)
    for m in (r.token, r.sequence, r.concat):
        assert m.token_logprobs.shape == (n,)
        assert m.token_logprobs.sum() == pytest.approx(m.logprob, abs=1e-9)
        assert np.all(m.token_logprobs <= 0)
    for m in (r.token, r.sequence):
        assert m.posterior.shape == (k,)
        assert m.posterior.sum() == pytest.approx(1, abs=1e-9)
    assert r.token.responsibilities.shape == (n, k)
    np.testing.assert_allclose(r.token.responsibilities.sum(1), 1, atol=1e-9)
    assert r.sequence.responsibilities.size == 0 and r.concat.posterior.size == 0


def test_one_passage_token_equals_sequence(gen, template):
    r = score_answer(gen, template, PASSAGES[1:2], np.zeros(1), QUESTION, ANSWER)
    assert r.token.logprob == pytest.approx(r.sequence.logprob, abs=1e-9)
    np.testing.assert_allclose(r.token.token_logprobs, r.sequence.token_logprobs, atol=1e-9)
    np.testing.assert_allclose(r.token.posterior, [1.0])
    np.testing.assert_allclose(r.token.responsibilities, 1.0)


def test_zero_prior_passage_drops_out(gen, template):
    with np.errstate(divide="ignore"):
        log_prior = np.log([0.6, 0.0, 0.4])
    r = score_answer(gen, template, PASSAGES, log_prior, QUESTION, ANSWER)
    assert r.token.posterior[1] == 0 and r.sequence.posterior[1] == 0
    assert np.all(r.token.responsibilities[:, 1] == 0)
    without = score_answer(
        gen, template, [PASSAGES[0], PASSAGES[2]], np.log([0.6, 0.4]), QUESTION, ANSWER
    )
    assert r.token.logprob == pytest.approx(without.token.logprob, abs=1e-9)
    assert r.sequence.logprob == pytest.approx(without.sequence.logprob, abs=1e-9)
    np.testing.assert_allclose(r.sequence.posterior[[0, 2]], without.sequence.posterior)


def test_prior_is_renormalised(gen, template):
    a = score_answer(gen, template, PASSAGES, LOG_PRIOR, QUESTION, ANSWER)
    b = score_answer(gen, template, PASSAGES, LOG_PRIOR + 3.0, QUESTION, ANSWER)
    assert a.token.logprob == pytest.approx(b.token.logprob, abs=1e-9)
    assert a.sequence.logprob == pytest.approx(b.sequence.logprob, abs=1e-9)


def test_errors(gen, template):
    with pytest.raises(ValidationError, match="answer"):
        score_answer(gen, template, PASSAGES, LOG_PRIOR, QUESTION, "")
    with pytest.raises(ValidationError, match="context"):
        score_answer(gen, template, PASSAGES, LOG_PRIOR, QUESTION, "Paris " * gen.max_positions)
    with pytest.raises(ValueError, match="shape"):
        score_answer(gen, template, PASSAGES, LOG_PRIOR[:2], QUESTION, ANSWER)
    with pytest.raises(ValueError, match="-inf"):
        score_answer(gen, template, PASSAGES, np.full(3, -np.inf), QUESTION, ANSWER)
