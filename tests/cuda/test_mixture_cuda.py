"""The CUDA mixture kernel against the numpy reference, on the CPU kernel's random cases.

Runs in Numba's CUDA simulator in CI (`NUMBA_ENABLE_CUDASIM=1 pytest tests/cuda`: small sizes,
each simulated thread is a Python thread) and on a real device in benchmarks/gpu_check.sh, where
RAGMIX_CUDA_REAL_SIZES=1 adds the real shapes (K up to 20 rows, V up to 151,936).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mixture_cases import (
    SETTINGS,
    assert_logprobs_close,
    assert_results_match,
    assert_row_logprob_matches,
    group_log_p,
    make_inputs,
    sampling_margins_ok,
    separated,
)

from ragmix.kernels import mixture_cuda, reference

if not mixture_cuda.available():
    pytest.skip("no CUDA device here; run with NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)
SIMULATED = mixture_cuda.SIMULATED
CASES = settings(SETTINGS, max_examples=10 if SIMULATED else 60)
small_inputs = st.builds(
    make_inputs,
    seed=st.integers(0, 2**32 - 1),
    n_groups=st.integers(1, 3),
    max_rows=st.sampled_from([1, 3, 6]),
    vocab=st.one_of(st.integers(1, 40), st.integers(41, 400 if SIMULATED else 5000)),
    scale=st.sampled_from([0.0, 0.5, 4.0, 1e4]),
    prior_mode=st.sampled_from(["finite", "some_inf", "single"]),
    masked=st.booleans(),
)


def greedy_is_decided(args) -> bool:
    for g in range(args[2].shape[0] - 1):
        log_p = group_log_p(args, g)
        top_two = np.sort(log_p)[::-1][:2]
        if not (top_two.shape[0] < 2 or top_two[0] == top_two[1] or top_two[0] - top_two[1] > 1e-5):
            return False
        if not separated(log_p, 1e-5):
            return False
    return True


def with_decoding(args, temperature: float, top_k: int, top_p: float):
    n = args[2].shape[0] - 1
    return (
        *args[:3],
        np.full(n, temperature, np.float32),
        np.full(n, top_k, np.int32),
        np.full(n, top_p, np.float32),
        *args[6:],
    )


@CASES
@given(args=small_inputs)
def test_greedy_step_matches_reference(args) -> None:
    assume(greedy_is_decided(args))
    assert_results_match(mixture_cuda.mixture_step(*args), reference.mixture_step(*args), args)


@settings(CASES, max_examples=6 if SIMULATED else 60)
@given(
    args=small_inputs,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.6]),
    top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
)
def test_sampled_step_same_uniform_same_token(args, temperature, top_k, top_p) -> None:
    args = with_decoding(args, temperature, top_k, top_p)
    for g in range(args[2].shape[0] - 1):
        assume(sampling_margins_ok(args, g))
    fast, ref = mixture_cuda.mixture_step(*args), reference.mixture_step(*args)
    np.testing.assert_array_equal(fast.token, ref.token)
    assert_logprobs_close(fast.logprob, ref.logprob)
    np.testing.assert_allclose(fast.responsibility, ref.responsibility, atol=1e-5)
    assert_row_logprob_matches(fast, ref, args)


def test_ties_go_to_the_lowest_id_in_every_set() -> None:
    """Equal logits everywhere: greedy, top-n, top_k and the nucleus all break ties by lower id,
    so a draw with top_k = 3 lands on tokens 0..2 only, in the reference's inverse-CDF order."""
    logits = np.zeros((2, 37), np.float32)
    prior = np.log(np.array([0.5, 0.5], np.float32))
    offsets = np.array([0, 2])
    for u, expected in ((0.1, 0), (0.5, 1), (0.9, 2)):
        args = (logits, prior, offsets, [1.0], [3], [1.0], [u], 4)
        out, ref = mixture_cuda.mixture_step(*args), reference.mixture_step(*args)
        assert out.token[0] == ref.token[0] == expected
        np.testing.assert_array_equal(out.top_ids, [[0, 1, 2, 3]])
    args = (logits, prior, offsets, [0.0], [0], [1.0], [0.5], 0)
    assert mixture_cuda.mixture_step(*args).token[0] == 0


def test_vocabulary_smaller_than_top_n_is_padded() -> None:
    logits = np.array([[0.0, 1.0, -1.0]], np.float32)
    args = (logits, np.zeros(1, np.float32), np.array([0, 1]), [0.0], [0], [1.0], [0.5], 5)
    out, ref = mixture_cuda.mixture_step(*args), reference.mixture_step(*args)
    np.testing.assert_array_equal(out.top_ids, ref.top_ids)
    np.testing.assert_array_equal(out.top_ids[0, 3:], [-1, -1])
    assert np.all(np.isneginf(out.top_logprobs[0, 3:]))


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (np.zeros((2, 5), np.float64), "float32"),
        (np.zeros((2, 5, 1), np.float32), r"\[rows, vocab\]"),
        (np.zeros((2, 0), np.float32), "at least 1 token"),
    ],
)
def test_bad_logits_raise_clear_errors(logits, message) -> None:
    from numba import cuda

    device = cuda.to_device(logits)
    args = (np.zeros(2, np.float32), np.array([0, 2]), [0.0], [0], [1.0], [0.5], 1)
    with pytest.raises(ValueError, match=message):
        mixture_cuda.mixture_step(device, *args)


def test_bad_parameters_raise_the_reference_errors() -> None:
    logits = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="offsets"):
        mixture_cuda.mixture_step(logits, np.zeros(2), [0, 1], [0.0], [0], [1.0], [0.5], 1)
    with pytest.raises(ValueError, match="top_n"):
        mixture_cuda.mixture_step(logits, np.zeros(2), [0, 2], [0.0], [0], [1.0], [0.5], 21)


REAL_SIZES = os.environ.get("RAGMIX_CUDA_REAL_SIZES") == "1" and not SIMULATED


@pytest.mark.skipif(not REAL_SIZES, reason="real sizes run on a device (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("rows", [1, 5, 20])
@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("decoding", [(0.0, 0, 1.0), (0.8, 50, 0.9), (1.0, 0, 0.95)])
def test_real_sizes_match_reference(rows, vocab, decoding) -> None:
    for seed in range(3):
        args = make_inputs(seed, 4, rows, vocab, 4.0, "finite", False, *decoding, top_n=5)
        args = (*args[:3], *args[3:6], args[6], 5)
        if not all(
            sampling_margins_ok(args, g) if decoding[0] else greedy_is_decided(args)
            for g in range(4)
        ):
            continue
        fast, ref = mixture_cuda.mixture_step(*args), reference.mixture_step(*args)
        np.testing.assert_array_equal(fast.token, ref.token)
        assert_logprobs_close(fast.logprob, ref.logprob)
        np.testing.assert_allclose(fast.responsibility, ref.responsibility, atol=1e-5)
