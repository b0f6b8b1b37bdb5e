"""Random cases for the mixture kernels (shared by the CPU kernel's tests and the CUDA kernel's):
inputs drawn from seeded numpy generators chosen by hypothesis, the formulas written directly, and
the comparisons with the reference (near-ties, where float rounding may legitimately decide
differently, are assumed away with margins well above the kernels' error)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ragmix import kernels
from ragmix.kernels import reference

TOL = 1e-5  # absolute, on log-probs and responsibilities


SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def make_inputs(
    seed: int,
    n_groups: int,
    max_rows: int,
    vocab: int,
    scale: float,
    prior_mode: str,
    masked: bool,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    top_n: int = 5,
):
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, max_rows + 1, n_groups)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    logits = (rng.standard_normal((offsets[-1], vocab)) * scale).astype(np.float32)  # rows x vocab
    if masked and vocab > 1:  # mask some tokens in some rows, never a whole row
        mask = rng.random(logits.shape) < 0.2
        mask[np.arange(logits.shape[0]), rng.integers(0, vocab, logits.shape[0])] = False
        logits[mask] = -np.inf
    log_prior = np.empty(offsets[-1], dtype=np.float32)  # rows
    for g in range(n_groups):
        k = rows[g]
        scores = rng.standard_normal(k) * 2
        if prior_mode == "some_inf" and k > 1:
            scores[rng.random(k) < 0.4] = -np.inf
            scores[rng.integers(0, k)] = rng.standard_normal()
        elif prior_mode == "single":
            scores[:] = -np.inf
            scores[rng.integers(0, k)] = 0.0
        log_prior[offsets[g] : offsets[g + 1]] = scores - np.logaddexp.reduce(scores)
    return (
        logits,
        log_prior,
        offsets,
        np.full(n_groups, temperature, dtype=np.float32),
        np.full(n_groups, top_k, dtype=np.int32),
        np.full(n_groups, top_p, dtype=np.float32),
        rng.random(n_groups),
        top_n,
    )


inputs = st.builds(
    make_inputs,
    seed=st.integers(0, 2**32 - 1),
    n_groups=st.integers(1, 4),
    max_rows=st.sampled_from([1, 3, 6]),
    vocab=st.one_of(st.integers(1, 40), st.integers(41, 5000)),  # CHUNK = 2048: up to 3 chunks
    scale=st.sampled_from([0.0, 0.5, 4.0, 1e4]),
    prior_mode=st.sampled_from(["finite", "some_inf", "single"]),
    masked=st.booleans(),
)


def direct_log_p_mix(logits: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """The RAG-Token marginal written independently: logaddexp over rows of prior + log_softmax."""
    out = np.full(logits.shape[1], -np.inf)
    for row, prior in zip(logits.astype(np.float64), log_prior.astype(np.float64), strict=True):
        finite = row[np.isfinite(row)]
        log_softmax = row - np.logaddexp.reduce(finite)
        out = np.logaddexp(out, prior + log_softmax)
    return out


def group_log_p(args, g: int) -> np.ndarray:
    logits, log_prior, offsets = args[:3]
    rows = slice(offsets[g], offsets[g + 1])
    return direct_log_p_mix(logits[rows], log_prior[rows])


def separated(values: np.ndarray, margin: float) -> bool:
    """Adjacent distinct values (in sorted order) differ by more than margin."""
    finite = np.sort(values[np.isfinite(values)])[::-1]
    gaps = -np.diff(finite)
    return bool(np.all((gaps == 0) | (gaps > margin)))


def assert_logprobs_close(actual: np.ndarray, expected: np.ndarray) -> None:
    # 1e-5 absolute, plus the float32 spacing of values as large as -2e4 (spreads of 1e4).
    np.testing.assert_allclose(actual, expected, atol=TOL, rtol=2**-21)


def direct_row_logprob(logits: np.ndarray, log_prior: np.ndarray, offsets, token) -> np.ndarray:
    """log_softmax(l_j)[token of j's group] in float64 (-inf where the prior is -inf), directly."""
    out = np.full(logits.shape[0], -np.inf)
    for g in range(offsets.shape[0] - 1):
        for j in range(offsets[g], offsets[g + 1]):
            if np.isfinite(log_prior[j]):
                row = logits[j].astype(np.float64)
                out[j] = row[token[g]] - np.logaddexp.reduce(row[np.isfinite(row)])
    return out


def assert_row_logprob_matches(fast: kernels.StepResult, ref: kernels.StepResult, args) -> None:
    """row_logprob: rows x float64 in both, equal to each other and to the direct formula."""
    logits, log_prior, offsets = args[:3]
    for out in (fast, ref):
        assert out.row_logprob.dtype == np.float64 and out.row_logprob.shape == log_prior.shape
    direct = direct_row_logprob(logits, log_prior, np.asarray(offsets), ref.token)
    np.testing.assert_allclose(ref.row_logprob, direct, atol=1e-9, rtol=1e-12)
    assert_logprobs_close(fast.row_logprob, ref.row_logprob)


def assert_results_match(fast: kernels.StepResult, ref: kernels.StepResult, args) -> None:
    offsets, top_n = args[2], args[7]
    np.testing.assert_array_equal(fast.token, ref.token)
    assert_logprobs_close(fast.logprob, ref.logprob)
    np.testing.assert_allclose(fast.responsibility, ref.responsibility, atol=TOL)
    sums = np.add.reduceat(fast.responsibility.astype(np.float64), offsets[:-1])
    np.testing.assert_allclose(sums, 1.0, atol=TOL)
    assert_logprobs_close(fast.top_logprobs, ref.top_logprobs)
    assert_row_logprob_matches(fast, ref, args)
    for g in range(offsets.shape[0] - 1):
        # Ids must agree except inside a run of (near-)equal values, where the order is float noise.
        values = ref.top_logprobs[g].astype(np.float64)
        for i in range(top_n):
            if not np.isfinite(values[i]):
                continue  # padding, or a token masked in every row: any such id will do
            if np.sum(np.abs(values[np.isfinite(values)] - values[i]) <= 1e-5) == 1:
                assert fast.top_ids[g, i] == ref.top_ids[g, i]


def sampling_margins_ok(args, g: int) -> bool:
    """The draw is not decided by float noise: no near-ties in order, no mass near a boundary."""
    temperature, top_k, top_p, uniform = (a[g] for a in args[3:7])
    log_p = group_log_p(args, g)
    if not separated(log_p, 1e-4):
        return False
    finite = np.sort(log_p[np.isfinite(log_p)])[::-1]
    if 0 < top_k < finite.shape[0] and finite[top_k - 1] - finite[top_k] <= 1e-4:
        return False
    vocab = log_p.shape[0]
    kept = reference.top_tokens(log_p, top_k if 0 < top_k < vocab else vocab)
    q = np.exp((log_p[kept] - log_p[kept[0]]) / temperature)
    cum = np.cumsum(q) / q.sum()
    if top_p < 1 and np.min(np.abs(cum - top_p)) <= 1e-4:
        return False
    _ids, probs = reference.sampling_distribution(
        log_p, float(temperature), int(top_k), float(top_p)
    )
    return bool(np.min(np.abs(np.cumsum(probs) - uniform)) > 1e-4)
