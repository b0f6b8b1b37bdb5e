"""The Numba mixture kernels against their numpy twins, and the twins against the formulas.

Inputs are drawn from seeded numpy generators chosen by hypothesis (arrays of thousands of logits
are cheaper to describe by seed than element by element). Near-ties, where float32 rounding may
legitimately decide differently, are assumed away with margins well above the kernels' error.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from mixture_cases import (
    SETTINGS,
    TOL,
    assert_logprobs_close,
    assert_results_match,
    assert_row_logprob_matches,
    direct_log_p_mix,
    group_log_p,
    inputs,
    sampling_margins_ok,
    separated,
)

from ragmix import kernels
from ragmix.kernels import mixture, reference


@SETTINGS
@given(args=inputs)
def test_greedy_step_matches_reference(args) -> None:
    n_groups = args[2].shape[0] - 1
    for g in range(n_groups):
        log_p = group_log_p(args, g)
        top_two = np.sort(log_p)[::-1][:2]
        assume(top_two.shape[0] < 2 or top_two[0] == top_two[1] or top_two[0] - top_two[1] > 1e-5)
        assume(separated(log_p, 1e-5))  # top_n order
    assert_results_match(kernels.mixture_step(*args), reference.mixture_step(*args), args)


@SETTINGS
@given(args=inputs)
def test_reference_matches_direct_formula(args) -> None:
    logits, log_prior, offsets = args[:3]
    ref = reference.mixture_step(*args)
    for g in range(offsets.shape[0] - 1):
        rows = slice(offsets[g], offsets[g + 1])
        log_p = group_log_p(args, g)
        assert ref.token[g] == int(np.flatnonzero(log_p == log_p.max())[0])
        assert ref.logprob[g] == pytest.approx(log_p[ref.token[g]], abs=TOL, rel=2**-21)
        x = logits[rows].astype(np.float64)
        log_softmax_tok = x[:, ref.token[g]] - np.log(np.sum(np.exp(x - x.max(1)[:, None]), 1))
        log_softmax_tok -= x.max(1)
        joint = log_prior[rows].astype(np.float64) + log_softmax_tok
        np.testing.assert_allclose(
            ref.responsibility[rows], np.exp(joint - log_p[ref.token[g]]), atol=TOL
        )
        finite = np.isfinite(log_prior[rows])
        np.testing.assert_array_equal(ref.row_logprob[rows][~finite], -np.inf)
        np.testing.assert_allclose(
            ref.row_logprob[rows][finite], log_softmax_tok[finite], atol=1e-9, rtol=1e-12
        )
        order = sorted(range(log_p.shape[0]), key=lambda v: (-log_p[v], v))[: args[7]]
        np.testing.assert_array_equal(ref.top_ids[g, : len(order)], order)


@SETTINGS
@given(
    args=inputs,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.6]),
    top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
)
def test_sampled_step_same_uniform_same_token(args, temperature, top_k, top_p) -> None:
    n_groups = args[2].shape[0] - 1
    args = (
        *args[:3],
        np.full(n_groups, temperature, np.float32),
        np.full(n_groups, top_k, np.int32),
        np.full(n_groups, top_p, np.float32),
        *args[6:],
    )
    for g in range(n_groups):
        assume(sampling_margins_ok(args, g))
    fast, ref = kernels.mixture_step(*args), reference.mixture_step(*args)
    np.testing.assert_array_equal(fast.token, ref.token)
    assert_logprobs_close(fast.logprob, ref.logprob)
    np.testing.assert_allclose(fast.responsibility, ref.responsibility, atol=TOL)
    assert_row_logprob_matches(fast, ref, args)


def repeated_groups(logits: np.ndarray, log_prior: np.ndarray, n: int, **decoding):
    """The same request n times in one step, each with its own uniform: n draws in one call."""
    k = logits.shape[0]
    uniform = np.random.default_rng(12345).random(n)
    return (
        np.tile(logits, (n, 1)),
        np.tile(log_prior, n),
        np.arange(n + 1, dtype=np.int64) * k,
        np.full(n, decoding.get("temperature", 1.0), np.float32),
        np.full(n, decoding.get("top_k", 0), np.int32),
        np.full(n, decoding.get("top_p", 1.0), np.float32),
        uniform,
        0,
    )


def tv_bound(categories: int, draws: int, failure: float = 1e-6) -> float:
    """Total variation that an empirical distribution exceeds with probability < failure.

    Bretagnolle-Huber-Carol: P(||p_hat - p||_1 >= 2 eps) <= 2^m exp(-2 n eps^2).
    """
    return math.sqrt((categories * math.log(2) + math.log(1 / failure)) / (2 * draws))


@pytest.mark.parametrize(
    "decoding", [{"temperature": 0.6}, {"temperature": 1.3, "top_k": 5, "top_p": 0.9}]
)
def test_draws_follow_the_tempered_mixture(decoding) -> None:
    rng = np.random.default_rng(7)
    vocab, n = 12, 20000
    logits = (rng.standard_normal((3, vocab)) * 1.5).astype(np.float32)  # rows x vocab
    log_prior = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    tokens = kernels.mixture_step(*repeated_groups(logits, log_prior, n, **decoding)).token
    log_p = direct_log_p_mix(logits, log_prior)
    ids, probs = reference.sampling_distribution(
        log_p, decoding["temperature"], decoding.get("top_k", 0), decoding.get("top_p", 1.0)
    )
    expected = np.zeros(vocab)
    expected[ids] = probs
    empirical = np.bincount(tokens, minlength=vocab) / n
    bound = tv_bound(vocab, n)  # false-failure rate < 1e-6
    assert 0.5 * np.abs(empirical - expected).sum() < bound
    # The test has power: the untempered, unfiltered mixture is far outside the bound.
    untempered = np.exp(log_p - np.logaddexp.reduce(log_p))
    assert 0.5 * np.abs(empirical - untempered).sum() > 2 * bound


@SETTINGS
@given(args=inputs, temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_top_k_one_and_tiny_temperature_are_greedy(args, temperature) -> None:
    n_groups = args[2].shape[0] - 1
    for g in range(n_groups):
        top_two = np.sort(group_log_p(args, g))[::-1][:2]
        assume(top_two.shape[0] < 2 or top_two[0] - top_two[1] > 1e-2)
    greedy = kernels.mixture_step(*args).token
    base = list(args)
    base[3] = np.full(n_groups, temperature, np.float32)
    base[4] = np.ones(n_groups, np.int32)
    np.testing.assert_array_equal(kernels.mixture_step(*base).token, greedy)
    base[3] = np.full(n_groups, 1e-4, np.float32)
    base[4] = np.zeros(n_groups, np.int32)
    np.testing.assert_array_equal(kernels.mixture_step(*base).token, greedy)


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
@pytest.mark.parametrize(
    ("top_k", "top_p", "nucleus"),
    [(0, 0.65, {7: 0.4, 2: 0.3}), (0, 0.75, {7: 0.4, 2: 0.3, 0: 0.2}), (3, 0.75, {7: 0.4, 2: 0.3}),
     (3, 0.8, {7: 0.4, 2: 0.3, 0: 0.2}), (2, 1.0, {7: 0.4, 2: 0.3}), (0, 0.3, {7: 0.4})],
)  # fmt: skip
def test_top_p_keeps_exactly_the_nucleus(impl, top_k, top_p, nucleus) -> None:
    probs = np.full(9, 0.1 / 6)
    probs[[7, 2, 0]] = [0.4, 0.3, 0.2]  # one row, T = 1: the mixture is exactly these
    logits = np.log(probs).astype(np.float32)[None, :]
    n = 2000
    args = list(repeated_groups(logits, np.zeros(1, np.float32), n, top_k=top_k, top_p=top_p))
    args[6] = (np.arange(n) + 0.5) / n  # a uniform grid: counts are the inverse CDF's intervals
    counts = np.bincount(impl.mixture_step(*args).token, minlength=9) / n
    assert set(np.flatnonzero(counts)) == set(nucleus)
    mass = sum(nucleus.values())
    for token, p in nucleus.items():
        assert counts[token] == pytest.approx(p / mass, abs=2 / n)


def test_single_finite_prior_row_owns_the_token() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    log_prior = np.array([-np.inf, 0.0, -np.inf], dtype=np.float32)
    args = (logits, log_prior, np.array([0, 3]), [0.0], [0], [1.0], [0.3], 3)
    for impl in (kernels, reference):
        out = impl.mixture_step(*args)
        np.testing.assert_array_equal(out.responsibility, [0.0, 1.0, 0.0])
        row = logits[1].astype(np.float64)
        log_softmax = row - np.logaddexp.reduce(row)
        assert out.row_logprob[[0, 2]].tolist() == [-np.inf, -np.inf]  # not normalised: no mass
        assert out.row_logprob[1] == pytest.approx(log_softmax.max(), abs=TOL)
        assert out.token[0] == int(np.argmax(row))
        assert out.logprob[0] == pytest.approx(log_softmax.max(), abs=TOL)
        np.testing.assert_array_equal(out.top_ids[0], np.argsort(-row)[:3])


def test_vocabulary_smaller_than_top_n_is_padded() -> None:
    args = (
        np.zeros((1, 2), np.float32),
        np.zeros(1, np.float32),
        [0, 1],
        [0.0],
        [0],
        [1.0],
        [0.0],
        4,
    )
    for impl in (kernels, reference):
        out = impl.mixture_step(*args)
        np.testing.assert_array_equal(out.top_ids[0], [0, 1, -1, -1])
        np.testing.assert_allclose(out.top_logprobs[0], [np.log(0.5)] * 2 + [-np.inf] * 2, atol=TOL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"log_prior": np.array([-np.inf, -np.inf, 0.0], np.float32)}, "group 0 has no row"),
        ({"offsets": np.array([0, 0, 3])}, "strictly increasing"),
        ({"top_n": 21}, "top_n must be in"),
        ({"top_p": np.array([0.0, 1.0], np.float32)}, "top_p must be in"),
        ({"uniform": np.array([0.5, 1.0])}, "uniform must be in"),
        ({"temperature": np.array([-1.0, 0.0], np.float32)}, "temperature must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message) -> None:
    args = {
        "logits": np.zeros((3, 4), np.float32),
        "log_prior": np.log(np.array([0.5, 0.5, 1.0], np.float32)),
        "offsets": np.array([0, 2, 3]),
        "temperature": np.zeros(2, np.float32),
        "top_k": np.zeros(2, np.int32),
        "top_p": np.ones(2, np.float32),
        "uniform": np.zeros(2),
        "top_n": 0,
    }
    args.update(change)
    for impl in (kernels, reference):
        with pytest.raises(ValueError, match=message):
            impl.mixture_step(**args)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    vocab=st.integers(1, 3000),
    scale=st.sampled_from([0.0, 1.0, 30.0, 1e4]),
)
def test_row_logprobs_match_reference_and_formula(seed, n, vocab, scale) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)  # rows x vocab
    targets = rng.integers(0, vocab, n)
    fast, ref = kernels.row_logprobs(logits, targets), reference.row_logprobs(logits, targets)
    assert_logprobs_close(fast, ref)
    x = logits.astype(np.float64)
    direct = x[np.arange(n), targets] - np.logaddexp.reduce(x, axis=1)
    assert_logprobs_close(ref, direct)


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
@pytest.mark.parametrize("vocab", [50, mixture.CHUNK * 2 + 7])
def test_row_logprob_is_exact_where_the_responsibility_underflows(impl, vocab) -> None:
    # Passage 1 puts the chosen token 200 nats below passage 0: r_1 ~ e^-204 is 0 in float32, so
    # log p_1(token) recovered from it (log r_1 + log p_mix - log prior_1) would be -inf.
    tok = vocab - 3  # in the last chunk when the vocabulary spans three
    logits = np.zeros((3, vocab), np.float32)  # rows x vocab
    logits[0, tok] = 5.0
    logits[1, tok] = -200.0
    logits[2] = np.linspace(-3, 3, vocab, dtype=np.float32)
    logits[2, tok] = 4.0
    log_prior = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    out = impl.mixture_step(logits, log_prior, [0, 3], [0.0], [0], [1.0], [0.5], 0)
    assert out.token[0] == tok
    assert out.responsibility[1] == 0.0  # underflowed
    with np.errstate(divide="ignore"):
        recovered = np.log(np.float64(out.responsibility[1])) + out.logprob[0] - log_prior[1]
    assert recovered == -np.inf  # what the float32 responsibility leaves
    x = logits.astype(np.float64)
    expected = x[:, tok] - np.logaddexp.reduce(x, axis=1)  # float64 log_softmax at the token
    assert np.all(np.isfinite(out.row_logprob))
    assert out.row_logprob[1] == pytest.approx(-200.0 - np.log(vocab - 1), abs=1e-6)
    np.testing.assert_allclose(out.row_logprob, expected, atol=1e-6, rtol=0)
    # The rows that did not underflow agree with their responsibilities.
    joint = log_prior.astype(np.float64) + out.row_logprob
    np.testing.assert_allclose(out.responsibility, np.exp(joint - out.logprob[0]), atol=TOL)


WARMUP_PROBE = r"""
import json, numba, numpy as np
from ragmix import kernels
from ragmix.kernels import mixture

def signatures():
    return {name: [str(s) for s in d.signatures] for name, d in vars(mixture).items()
            if isinstance(d, numba.core.registry.CPUDispatcher) and d.signatures}

out = {"before": signatures(), "seconds": kernels.warmup()}
out["after"] = signatures()
# Steps as the engine builds them (engine step: float32 logits from the generator, priors
# concatenated per request, np.array(..., np.float32 / np.int32 / np.float64), an int top_n), of
# several sizes, greedy and sampled, with and without top_n; and Score's row_logprobs.
rng = np.random.default_rng(0)
for rows, vocab, top_n, temperature in ((1, 10, 0, 0.0), (5, 3000, 5, 0.0), (7, 4099, 0, 0.8),
                                         (2, 64, 20, 1.3)):
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    log_prior = np.log(np.full(rows, 1.0 / rows))  # float64, as np.log of the float priors
    offsets = np.zeros(2, np.int64)
    np.cumsum([rows], out=offsets[1:])
    kernels.mixture_step(logits, np.concatenate([log_prior]), offsets,
                         np.array([temperature], np.float32), np.array([3], np.int32),
                         np.array([0.9], np.float32), np.array([0.25], np.float64), top_n)
    kernels.row_logprobs(logits, rng.integers(0, vocab, rows))
    kernels.row_logprobs(logits.astype(np.float64), np.zeros(rows, np.int32))
out["after_engine_calls"] = signatures()
print(json.dumps(out))
"""


def test_warmup_compiles_what_the_engine_calls_so_requests_never_compile() -> None:
    # A fresh interpreter: nothing compiled before warmup, so what is there after is its doing.
    r = subprocess.run(
        [sys.executable, "-c", WARMUP_PROBE], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["before"] == {}
    assert out["seconds"] >= 0
    for entry in ("_mixture_step", "_row_logprobs"):
        assert len(out["after"].get(entry, [])) == 1, out["after"]
    # The engine's dtypes and shapes hit the compiled signatures: nothing new is compiled.
    assert out["after_engine_calls"] == out["after"]


def test_chunk_boundaries() -> None:
    # A vocabulary one past a chunk boundary, with the argmax in the last, one-token chunk.
    logits = np.zeros((2, mixture.CHUNK + 1), np.float32)
    logits[:, -1] = 3.0
    out = kernels.mixture_step(
        logits, np.log(np.full(2, 0.5, np.float32)), [0, 2], [0.0], [0], [1.0], [0.0], 2
    )
    assert out.token[0] == mixture.CHUNK
    assert out.top_ids[0].tolist() == [mixture.CHUNK, 0]
