"""The RAG-Token mixture step in plain numpy: the definition the Numba kernels are tested against.

Math (Lewis et al. 2020; Hugging Face `RagTokenForGeneration.marginalize`), for the rows j of one
request with prior log p_eta(z_j|x) and logits l_j:

    log p_mix(v)  = logsumexp_j [ log_prior_j + log_softmax(l_j)[v] ]
    r_j(token)    = softmax_j   [ log_prior_j + log_softmax(l_j)[token] ]      (responsibility)
    row_logprob_j = log_softmax(l_j)[token] = l_j[token] - logsumexp(l_j)     (log p_j(token))

row_logprob is what a sequence's posterior p(z_j|x,y) sums over tokens. It is returned directly,
from the row's log-normaliser, because recovering it from the float32 responsibility
(log r_j + log p_mix - log_prior_j) fails exactly when it matters: a passage that explains the
token e^-104 times worse than another has r_j = 0 in float32, and log 0 = -inf.

The prior is used exactly as given (no renormalisation): the engine passes log_softmax of the
retrieval scores over the K retrieved passages, so the mixture sums to 1. Rows whose prior is -inf
contribute nothing. Everything here is computed in float64, so this module is the yardstick.

Token choice, shared with `mixture.py` token for token:
- temperature 0: greedy, the argmax of log p_mix (the lowest token id on ties).
- temperature T > 0: the tempered distribution q(v) ∝ exp(log p_mix(v) / T); keep the top_k
  tokens by log p_mix (top_k 0 = all); order the kept tokens by log p_mix descending, ties by lower
  token id; keep the nucleus, the shortest prefix of that order whose q-mass is >= top_p times the
  mass of the kept tokens (top_p 1 = all); draw by inverse CDF: with c_i the cumulative q-mass of
  the nucleus in that order, the token is the first i with c_i > uniform * c_last.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

LOG = logging.getLogger(__name__)

MAX_TOP_N = 20


class StepResult(NamedTuple):
    """What one mixture step returns for G requests (groups) over R passage rows."""

    token: np.ndarray  # groups, int64: the chosen token of each request
    logprob: np.ndarray  # groups, float32: log p_mix(token), un-tempered
    responsibility: np.ndarray  # rows, float32: r_j(token), sums to 1 within each group
    top_ids: np.ndarray  # groups x top_n, int64: the top_n tokens by log p_mix, descending
    top_logprobs: np.ndarray  # groups x top_n, float32: their log p_mix
    # (a vocabulary smaller than top_n pads top_ids with -1 and top_logprobs with -inf)
    row_logprob: np.ndarray  # rows, float64: log_softmax(logits_j)[token of j's group], i.e.
    # log p_j(token), exact from the row's log-normaliser (float64: it is summed over a sequence).
    # -inf where log_prior_j is -inf: such rows are not normalised (the kernel skips their exps)
    # and carry no weight in the mixture or in any posterior. Appended last: older fields keep
    # their positions.


def check_step_inputs(
    logits: np.ndarray,
    log_prior: np.ndarray,
    offsets: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
    top_n: int,
) -> tuple[np.ndarray, ...]:
    """Check shapes and ranges once, and return the arrays in the dtypes the kernels take.

    These are engine-internal contracts (request parameters are validated before they get here), so
    a failure is a bug in the caller and raises ValueError. Cheap: touches only O(rows) numbers.
    """
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [rows, vocab], got shape {logits.shape}.")
    n_rows, vocab = logits.shape
    if vocab < 1:
        raise ValueError("logits must have a vocabulary of at least 1 token, got 0.")
    params = check_step_params(
        n_rows, vocab, log_prior, offsets, temperature, top_k, top_p, uniform, top_n
    )
    return (logits, *params)


def check_step_params(
    n_rows: int,
    vocab: int,
    log_prior: np.ndarray,
    offsets: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
    top_n: int,
) -> tuple[Any, ...]:
    """`check_step_inputs` without the logits (which may live on a device): everything but them,
    checked against their shape n_rows x vocab."""
    log_prior = np.ascontiguousarray(log_prior, dtype=np.float32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if log_prior.shape != (n_rows,):
        raise ValueError(f"log_prior must have shape ({n_rows},), got {log_prior.shape}.")
    if offsets.ndim != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D with at least 2 entries, got shape {offsets.shape}.")
    n_groups = offsets.shape[0] - 1
    if offsets[0] != 0 or offsets[-1] != n_rows:
        raise ValueError(
            f"offsets must start at 0 and end at the row count {n_rows}, "
            f"got {offsets[0]} and {offsets[-1]}."
        )
    if np.any(np.diff(offsets) < 1):
        raise ValueError("offsets must be strictly increasing: every group needs at least one row.")
    if np.isnan(log_prior).any() or (log_prior == np.inf).any():
        raise ValueError("log_prior must be finite or -inf, got NaN or +inf.")
    finite_rows = np.isfinite(log_prior).astype(np.int64)  # rows
    finite_per_group = np.add.reduceat(finite_rows, offsets[:-1])  # groups
    if np.any(finite_per_group == 0):
        bad = int(np.flatnonzero(finite_per_group == 0)[0])
        raise ValueError(f"group {bad} has no row with a finite log_prior.")

    temperature = np.ascontiguousarray(temperature, dtype=np.float32)
    top_k = np.ascontiguousarray(top_k, dtype=np.int32)
    top_p = np.ascontiguousarray(top_p, dtype=np.float32)
    uniform = np.ascontiguousarray(uniform, dtype=np.float64)
    for name, arr in (
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("uniform", uniform),
    ):
        if arr.shape != (n_groups,):
            raise ValueError(f"{name} must have shape ({n_groups},), got {arr.shape}.")
    if not np.all(np.isfinite(temperature) & (temperature >= 0)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}.")
    if np.any(top_k < 0):
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}.")
    if not np.all((top_p > 0) & (top_p <= 1)):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if not np.all((uniform >= 0) & (uniform < 1)):
        raise ValueError(f"uniform must be in [0, 1), got {uniform}.")
    top_n = int(top_n)
    if not 0 <= top_n <= MAX_TOP_N:
        raise ValueError(f"top_n must be in [0, {MAX_TOP_N}], got {top_n}.")
    return log_prior, offsets, temperature, top_k, top_p, uniform, top_n


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """logsumexp that treats all -inf slices as -inf (no NaN, no warning)."""
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return np.squeeze(out, axis=axis)


def row_log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax(logits_j)[v] for every row, in float64."""
    x = logits.astype(np.float64)  # k x vocab
    return x - _logsumexp(x, axis=1)[:, None]  # k x vocab


def group_joint(logits: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """log p_eta(z_j|x) + log_softmax(logits_j)[v] for the rows of one request, in float64."""
    return log_prior.astype(np.float64)[:, None] + row_log_softmax(logits)  # k x vocab


def descending_order(log_p: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Positions of `log_p` by value descending, ties by lower token id (the draw order)."""
    if ids is None:
        ids = np.arange(log_p.shape[0])
    return np.lexsort((ids, -log_p))


def top_tokens(log_p: np.ndarray, n: int) -> np.ndarray:
    """The ids of the n largest entries, descending, ties by lower id, without a full sort."""
    vocab = log_p.shape[0]
    if n >= vocab:
        return descending_order(log_p)
    kth = np.partition(log_p, vocab - n)[vocab - n]
    ids = np.flatnonzero(log_p >= kth)  # every token tied with the n-th value is a candidate
    return ids[descending_order(log_p[ids], ids)][:n]


def sampling_distribution(
    log_p_mix: np.ndarray, temperature: float, top_k: int, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a sampled step can draw, in draw order, with their probabilities (sum to 1).

    Order: log p_mix descending, ties by lower id. Filters: top_k (0 = off) on log p_mix, then the
    nucleus over the tempered distribution renormalised on the top_k tokens.
    """
    log_p_mix = np.asarray(log_p_mix, dtype=np.float64)  # vocab
    vocab = log_p_mix.shape[0]
    ids = top_tokens(log_p_mix, top_k if 0 < top_k < vocab else vocab)
    tempered = (log_p_mix[ids] - log_p_mix[ids[0]]) / temperature  # kept
    q = np.exp(tempered)  # kept
    if top_p < 1.0:
        cum = np.cumsum(q)  # kept
        n_keep = int(np.searchsorted(cum, top_p * cum[-1], side="left")) + 1
        ids, q = ids[:n_keep], q[:n_keep]
    return ids, q / q.sum()


def draw(ids: np.ndarray, probs: np.ndarray, uniform: float) -> int:
    """Inverse CDF in the given order: the first token whose cumulative probability exceeds u."""
    cum = np.cumsum(probs)  # kept
    i = int(np.searchsorted(cum, uniform * cum[-1], side="right"))
    if i >= ids.shape[0]:  # rounding at the very top: the last token with mass
        i = int(np.flatnonzero(probs > 0)[-1])
    return int(ids[i])


def mixture_step(
    logits: np.ndarray,
    log_prior: np.ndarray,
    offsets: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
    top_n: int,
) -> StepResult:
    """One RAG-Token step for all requests: choose each request's token and report the mixture.

    logits [R, V] float32; log_prior [R]; offsets [G+1] (request g owns rows offsets[g]:offsets[g+1]);
    temperature [G] (0 = greedy); top_k [G] (0 = off); top_p [G] (1 = off); uniform [G] in [0, 1)
    (one draw per request from its own seeded generator); top_n in [0, 20].
    """
    logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n = check_step_inputs(
        logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n
    )
    n_groups = offsets.shape[0] - 1
    token = np.empty(n_groups, dtype=np.int64)
    logprob = np.empty(n_groups, dtype=np.float32)
    responsibility = np.empty(log_prior.shape[0], dtype=np.float32)
    top_ids = np.empty((n_groups, top_n), dtype=np.int64)
    top_logprobs = np.empty((n_groups, top_n), dtype=np.float32)
    row_logprob = np.full(log_prior.shape[0], -np.inf, dtype=np.float64)
    for g in range(n_groups):
        rows = slice(offsets[g], offsets[g + 1])
        log_p_rows = row_log_softmax(logits[rows])  # k x vocab
        joint = log_prior[rows].astype(np.float64)[:, None] + log_p_rows  # k x vocab
        log_p_mix = _logsumexp(joint, axis=0)  # vocab
        if temperature[g] == 0:
            tok = int(np.argmax(log_p_mix))  # first maximum = lowest id on ties
        else:
            ids, probs = sampling_distribution(
                log_p_mix, float(temperature[g]), int(top_k[g]), float(top_p[g])
            )
            tok = draw(ids, probs, float(uniform[g]))
        token[g] = tok
        logprob[g] = log_p_mix[tok]
        responsibility[rows] = np.exp(joint[:, tok] - log_p_mix[tok])  # k
        finite = np.isfinite(log_prior[rows])  # k
        row_logprob[rows] = np.where(finite, log_p_rows[:, tok], -np.inf)  # k
        if top_n:
            top = top_tokens(log_p_mix, top_n)
            # A vocabulary smaller than top_n: pad with id -1 and log-prob -inf.
            top_ids[g] = -1
            top_logprobs[g] = -np.inf
            top_ids[g, : top.shape[0]] = top
            top_logprobs[g, : top.shape[0]] = log_p_mix[top]
    return StepResult(token, logprob, responsibility, top_ids, top_logprobs, row_logprob)


def row_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[n, targets[n]] for every row n: scores many positions in one call."""
    logits, targets = check_row_inputs(logits, targets)
    x = logits.astype(np.float64)  # rows x vocab
    lse = _logsumexp(x, axis=1)  # rows
    return (x[np.arange(x.shape[0]), targets] - lse).astype(np.float32)


def check_row_inputs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and the target range for `row_logprobs`; ValueError on a caller bug."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"row_logprobs needs logits [N, V] and targets [N], got {logits.shape} and "
            f"{targets.shape}."
        )
    if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(
            f"targets must be token ids in [0, {logits.shape[1] - 1}], "
            f"got {targets.min()}..{targets.max()}."
        )
    return logits, targets
