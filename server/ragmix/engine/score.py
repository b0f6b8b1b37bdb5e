"""Score a given answer under the three mixtures of docs/DESIGN.md § The model, from one batched generator pass.

Every passage prompt (and the Concat prompt) is followed by the answer tokens and run as one row of
a left-padded batch; the logits at the positions that predict the answer tokens give
lp[j, i] = log p_phi(y_i | x, z_j, y_<i). The mixtures are then pure arithmetic on lp:

- TOKEN:    log p(y_i | x, y_<i) = logsumexp_j [ log p_eta(z_j|x) + lp[j, i] ]
- SEQUENCE: log p(y | x)         = logsumexp_j [ log p_eta(z_j|x) + sum_i lp[j, i] ]
- CONCAT:   log p(y | x, z_1..z_K) = sum_i lp[concat row, i]

The prior is renormalised over the K given passages (what Hugging Face does with
log_softmax(doc_scores)); a prior of 0 (-inf) removes a passage. Sums run in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ragmix import kernels
from ragmix.engine.prompts import PromptTemplate, concat_text, passage_text, tokenize_prompt
from ragmix.errors import ValidationError

if TYPE_CHECKING:
    from ragmix.models.generator import Generator

LOG = logging.getLogger(__name__)

# Logits of one scoring pass are rows x positions x vocab float32; larger batches are split into
# passes under this size so a long answer under many passages cannot exhaust memory.
LOGITS_BUDGET_BYTES = 256 << 20


@dataclass
class MixtureScore:
    logprob: float  # log p(y | x) under this mixture
    token_logprobs: np.ndarray  # N: per-token log-probs, sum to logprob
    posterior: np.ndarray  # K: p(z_j | x, y); size 0 for CONCAT
    responsibilities: np.ndarray  # N x K: r_ij (TOKEN only; size 0 otherwise)


@dataclass
class ScoreResult:
    answer_ids: list[int]
    token: MixtureScore
    sequence: MixtureScore
    concat: MixtureScore


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """logsumexp in float64 that gives -inf (no NaN, no warning) for an all -inf slice."""
    x = np.asarray(x, dtype=np.float64)
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return np.squeeze(out, axis=axis)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """softmax that maps -inf entries to exactly 0."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(x - np.expand_dims(logsumexp(x, axis), axis))


def normalize_log_prior(log_prior: np.ndarray, k: int) -> np.ndarray:
    """The prior as float64 log-probs summing to 1 over the k passages (-inf entries stay -inf)."""
    log_prior = np.asarray(log_prior, dtype=np.float64)
    if log_prior.shape != (k,):
        raise ValueError(
            f"log_prior must have shape ({k},) for {k} passages, got {log_prior.shape}."
        )
    if np.isnan(log_prior).any() or (log_prior == np.inf).any():
        raise ValueError("log_prior must be finite or -inf, got NaN or +inf.")
    if not np.isfinite(log_prior).any():
        raise ValueError("log_prior must give at least one passage a nonzero prior; all are -inf.")
    return log_prior - logsumexp(log_prior, axis=0)


def continuation_logprobs(
    generator: Generator,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
) -> list[np.ndarray]:
    """log p(c_t | prompt, c_<t) for every token of every row's continuation, float64 [len(c)] each.

    One generator pass over all rows (prompt + continuation, left-padded), logits taken only at the
    positions that predict a continuation token; passes are split only above LOGITS_BUDGET_BYTES.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token to predict the continuation from.")
    longest = max((len(p) + len(c) for p, c in zip(prompts, continuations, strict=True)), default=0)
    if longest > generator.max_positions:
        raise ValidationError(
            "answer",
            f"prompt plus answer is {longest} tokens, more than the generator's context of "
            f"{generator.max_positions}; use a shorter answer or fewer passages.",
        )
    width = max((len(c) for c in continuations), default=0)
    per_row = max(width, 1) * generator.vocab_size * 4
    step = max(1, LOGITS_BUDGET_BYTES // per_row)
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), step):
        out += _score_pass(
            generator, prompts[start : start + step], continuations[start : start + step]
        )
    return out


def _score_pass(
    generator: Generator, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    rows = len(prompts)
    full = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    seq = max(len(f) for f in full)
    width = max(1, max(len(c) for c in continuations))
    ids = np.full((rows, seq), generator.pad_token_id, np.int64)  # rows x S, right-padded
    logits_index = np.zeros((rows, width), np.int64)  # rows x positions
    for r, (p, c, f) in enumerate(zip(prompts, continuations, full, strict=True)):
        ids[r, : len(f)] = f
        # The logits at p's last token predict c[0]; padded positions repeat the last one.
        logits_index[r] = len(p) - 1 + np.minimum(np.arange(width), max(len(c) - 1, 0))
    cache = generator.new_cache(rows, seq)
    logits = generator.forward(ids, np.zeros(rows, np.int64), logits_index, cache)
    picked = np.concatenate(
        [logits[r, : len(c)] for r, c in enumerate(continuations)]
        + [np.zeros((0, logits.shape[2]), np.float32)]
    )  # tokens x V
    targets = np.fromiter((t for c in continuations for t in c), np.int64)  # tokens
    lp = kernels.row_logprobs(picked, targets).astype(np.float64)  # tokens
    bounds = np.cumsum([0] + [len(c) for c in continuations])
    return [lp[bounds[r] : bounds[r + 1]] for r in range(rows)]


def token_mixture(lp: np.ndarray, log_prior: np.ndarray) -> MixtureScore:
    """RAG-Token from per-passage token log-probs lp [K, N] and a normalised log prior [K]."""
    joint = log_prior[:, None] + lp  # K x N
    token_logprobs = logsumexp(joint, axis=0)  # N
    return MixtureScore(
        logprob=float(token_logprobs.sum()),
        token_logprobs=token_logprobs,
        posterior=sequence_posterior(lp, log_prior),
        responsibilities=softmax(joint, axis=0).T,  # N x K
    )


def prefix_log_joint(lp: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """log p_eta(z_j|x) + log p_phi(y_<=i | x, z_j) for every prefix i: K x N."""
    return log_prior[:, None] + np.cumsum(lp, axis=1)  # K x N


def sequence_posterior(lp: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """p(z_j | x, y) = softmax_j(log prior_j + sum_i lp[j, i]): K."""
    if lp.shape[1] == 0:
        return softmax(log_prior, axis=0)
    return softmax(prefix_log_joint(lp, log_prior)[:, -1], axis=0)


def sequence_mixture(lp: np.ndarray, log_prior: np.ndarray) -> MixtureScore:
    """RAG-Sequence from lp [K, N]; token_logprobs are the increments of log p(y_<=i | x)."""
    prefix = logsumexp(prefix_log_joint(lp, log_prior), axis=0)  # N: log p(y_<=i | x)
    token_logprobs = np.diff(prefix, prepend=logsumexp(log_prior, axis=0))  # N
    return MixtureScore(
        logprob=float(prefix[-1]) if prefix.size else 0.0,
        token_logprobs=token_logprobs,
        posterior=sequence_posterior(lp, log_prior),
        responsibilities=np.empty((0, lp.shape[0])),
    )


def concat_mixture(lp: np.ndarray) -> MixtureScore:
    """Concat: the single row's token log-probs, no latent passage."""
    lp = np.asarray(lp, dtype=np.float64)  # N
    return MixtureScore(float(lp.sum()), lp, np.empty(0), np.empty((0, 0)))


def passage_prompts(
    generator: Generator,
    template: PromptTemplate,
    passages: Sequence[tuple[str, str]],
    question: str,
) -> list[list[int]]:
    """Token ids of the K passage prompts, tokenised passage part + rest as the engine does."""
    return [
        tokenize_prompt(template, generator.encode, passage_text(title, text), question).ids
        for title, text in passages
    ]


def score_answer(
    generator: Generator,
    template: PromptTemplate,
    passages: Sequence[tuple[str, str]],
    log_prior: np.ndarray,
    question: str,
    answer: str,
) -> ScoreResult:
    """log p(answer | question) under TOKEN, SEQUENCE and CONCAT from one batched generator pass.

    passages: (title, text) of the K passages in rank order; log_prior [K]: log p_eta(z_j | x).
    """
    if not passages:
        raise ValueError("score_answer needs at least one passage.")
    log_prior = normalize_log_prior(log_prior, len(passages))
    answer_ids = generator.encode(answer)
    if not answer_ids:
        raise ValidationError("answer", "answer must contain at least one token, got an empty one.")
    prompts = passage_prompts(generator, template, passages, question)
    prompts.append(tokenize_prompt(template, generator.encode, concat_text(passages), question).ids)
    lp = np.stack(continuation_logprobs(generator, prompts, [answer_ids] * len(prompts)))  # K+1 x N
    return score_result(answer_ids, lp, log_prior)


def score_result(answer_ids: list[int], lp: np.ndarray, log_prior: np.ndarray) -> ScoreResult:
    """The three mixtures from lp [K+1, N] (the K passage rows, then the Concat row) and the
    normalised log prior [K]."""
    k = log_prior.shape[0]
    return ScoreResult(
        answer_ids=answer_ids,
        token=token_mixture(lp[:k], log_prior),
        sequence=sequence_mixture(lp[:k], log_prior),
        concat=concat_mixture(lp[k]),
    )
