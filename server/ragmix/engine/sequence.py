"""RAG-Sequence decoding (Lewis et al. 2020 §2.4): beam search per passage, then marginalise.

- Beam search follows Hugging Face's `generate(num_beams=B)` defaults (transformers 5.x): the top
  max(2, 1 + #EOS) * B continuations of all beams each step; a continuation that ends (EOS, or the
  last allowed token) becomes a finished hypothesis only if it ranks in the top B; the B best
  running ones go on; length_penalty 1.0, i.e. a hypothesis scores sum(log p) / length with the
  EOS token counted in the length; early_stopping=False (stop once B hypotheses are finished and
  the best running beam, divided by its current length, cannot beat the worst of them).
- "thorough" (HF `RagSequenceForGeneration.generate`): every distinct hypothesis of every
  passage's beams is rescored under every passage (one batched pass), and the one with the highest
  log p(y|x) = logsumexp_j [log p_eta(z_j|x) + log p_phi(y|x,z_j)] wins; no length normalisation.
- "fast" (ParlAI): a hypothesis' score under passage j is its beam log-prob if passage j's beam
  produced it, else log 0; identical hypotheses are merged by log-add-exp over passages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ragmix.engine import kv
from ragmix.engine.prompts import PromptTemplate
from ragmix.engine.score import (
    continuation_logprobs,
    logsumexp,
    normalize_log_prior,
    passage_prompts,
    prefix_log_joint,
    sequence_mixture,
    sequence_posterior,
    softmax,
)
from ragmix.errors import ValidationError

if TYPE_CHECKING:
    from ragmix.models.generator import Generator

LOG = logging.getLogger(__name__)

LENGTH_PENALTY = 1.0  # HF's default: score = sum log p / length ** LENGTH_PENALTY
MODES = ("thorough", "fast")


@dataclass
class Hypothesis:
    ids: list[int]  # generated tokens, the EOS excluded
    logprob: float  # sum of log p over the scored tokens (the EOS included when finished)
    finished: bool  # ended with an EOS token (else it ran to max_new_tokens)
    eos_id: int | None = None  # the EOS token that ended it
    token_logprobs: list[float] = field(default_factory=list)  # one per scored token

    @property
    def scored_ids(self) -> list[int]:
        """The tokens whose log-probs make up `logprob`: ids, then the EOS if finished."""
        return [*self.ids, self.eos_id] if self.finished else list(self.ids)

    @property
    def score(self) -> float:
        """Beam ranking score: length-normalised log-prob, the EOS counted in the length."""
        return self.logprob / len(self.scored_ids) ** LENGTH_PENALTY


@dataclass
class SequenceAnswer:
    ids: list[int]  # the chosen answer; ends with the EOS token when finish_reason == "eos"
    logprob: float  # log p(y | x), the RAG-Sequence marginal over passages
    token_logprobs: np.ndarray  # N: increments of log p(y_<=i | x), sum to logprob
    responsibilities: np.ndarray  # N x K: p(z_j | x, y_<=i)
    posterior: np.ndarray  # K: p(z_j | x, y)
    finish_reason: str  # "eos" | "length"
    candidates: int  # distinct hypotheses considered
    ranked: list[RankedSequence] = field(default_factory=list)  # best first, the answer included


@dataclass
class RankedSequence:
    ids: list[int]  # ends with the EOS token when the hypothesis finished
    logprob: float  # log p(y | x), the RAG-Sequence marginal
    posterior: np.ndarray  # K: p(z_j | x, y)


class BeamState:
    """The beam search state of one prompt (one passage): the standalone `beam_search` and the
    engine, whose beams are rows of the running batch, advance it the same way."""

    def __init__(self) -> None:
        self.live: list[list[int]] = [[]]  # running beams' tokens
        self.live_logprobs: list[list[float]] = [[]]
        self.scores = np.zeros(1)  # running beams' sum log p
        self.finished: list[Hypothesis] = []
        self.done = False

    def advance(
        self, logp: np.ndarray, step: int, last: bool, eos: np.ndarray, num_beams: int
    ) -> tuple[list[int], list[int]]:
        """One step over this prompt's beams (logp: beams x V log-probs); returns, for the next
        running beams, the beam index each extends and the token it appends."""
        vocab = logp.shape[1]
        acc = (self.scores[:, None] + logp).ravel()  # beams*V
        n = min(max(2, 1 + eos.size) * num_beams, acc.size)
        top = np.argpartition(-acc, n - 1)[:n]
        top = top[np.lexsort((top, -acc[top]))]  # by score descending, ties by lower index
        parents, tokens = np.divmod(top, vocab)
        is_eos = np.isin(tokens, eos)
        hits = is_eos | last
        for r in np.flatnonzero(hits[:num_beams]):
            b, tok = int(parents[r]), int(tokens[r])
            self.finished.append(
                Hypothesis(
                    ids=self.live[b] + ([] if is_eos[r] else [tok]),
                    logprob=float(acc[top[r]]),
                    finished=bool(is_eos[r]),
                    eos_id=tok if is_eos[r] else None,
                    token_logprobs=self.live_logprobs[b] + [float(logp[b, tok])],
                )
            )
        self.finished.sort(key=lambda h: -h.score)  # stable: earlier ones win ties
        del self.finished[num_beams:]
        running = np.flatnonzero(~hits)[:num_beams]
        self.live = [self.live[parents[r]] + [int(tokens[r])] for r in running]
        self.live_logprobs = [
            self.live_logprobs[parents[r]] + [float(logp[parents[r], tokens[r]])] for r in running
        ]
        self.scores = acc[top[running]]
        if last or running.size == 0:
            self.done = True
        elif len(self.finished) == num_beams:
            best_running = self.scores[0] / (step + 1) ** LENGTH_PENALTY
            self.done = bool(best_running <= self.finished[-1].score)
        return [int(parents[r]) for r in running], [int(tokens[r]) for r in running]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: rows x V."""
    x = logits.astype(np.float64)  # rows x V
    return x - logsumexp(x, axis=1)[:, None]


def beam_search(
    generator: Generator,
    prompts: list[list[int]],
    num_beams: int,
    max_new_tokens: int,
) -> list[list[Hypothesis]]:
    """Beam search for every prompt, all prompts' beams as rows of one KV-cached pass per step.

    Returns, per prompt, up to num_beams hypotheses sorted best first by `Hypothesis.score`.
    """
    if num_beams < 1:
        raise ValidationError("num_beams", f"num_beams must be >= 1, got {num_beams}.")
    if max_new_tokens < 1:
        raise ValidationError(
            "max_new_tokens", f"max_new_tokens must be >= 1, got {max_new_tokens}."
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("beam_search needs at least one prompt, each of at least one token.")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > generator.max_positions:
        raise ValidationError(
            "max_new_tokens",
            f"the prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
            f"generator's context of {generator.max_positions} tokens; ask for fewer tokens.",
        )
    eos = np.array(sorted(generator.eos_token_ids), np.int64)
    states = [BeamState() for _ in prompts]
    logits, batch = kv.prefill(generator, prompts)  # rows x V: one row per prompt to start
    for step in range(max_new_tokens):
        last = step + 1 == max_new_tokens
        logp = log_softmax(logits)  # rows x V
        rows: list[int] = []
        tokens: list[int] = []
        offset = 0
        for state in states:
            if state.done:
                continue
            width = len(state.live)
            parents, toks = state.advance(logp[offset : offset + width], step, last, eos, num_beams)
            if not state.done:
                rows += [offset + p for p in parents]
                tokens += toks
            offset += width
        if not rows:
            break
        batch = kv.select(batch, np.array(rows, np.int64))
        batch.last = np.array(tokens, np.int64)
        logits = kv.decode(generator, batch)
    return [state.finished for state in states]


def rag_sequence(
    generator: Generator,
    template: PromptTemplate,
    passages: Sequence[tuple[str, str]],
    log_prior: np.ndarray,
    question: str,
    *,
    num_beams: int,
    max_new_tokens: int,
    mode: Literal["thorough", "fast"] = "thorough",
    num_return_sequences: int = 1,
) -> SequenceAnswer:
    """Decode one answer under RAG-Sequence: beams per passage, then marginalise (module doc).

    passages: (title, text) of the K passages; log_prior [K]: log p_eta(z_j | x), renormalised
    here; passages with a prior of 0 (-inf) get no beam search and zero posterior.
    """
    if mode not in MODES:
        raise ValidationError("mode", f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if not passages:
        raise ValueError("rag_sequence needs at least one passage.")
    k = len(passages)
    log_prior = normalize_log_prior(log_prior, k)
    prompts = passage_prompts(generator, template, passages, question)
    active = [int(j) for j in np.flatnonzero(np.isfinite(log_prior))]
    beams = beam_search(generator, [prompts[j] for j in active], num_beams, max_new_tokens)

    found = candidates(active, beams)
    lps = (
        thorough_logprobs(generator, prompts, active, found, k)
        if mode == "thorough"
        else fast_logprobs(found, k)
    )
    return marginalize(found, lps, log_prior, num_return_sequences)


Candidates = dict[tuple[int, ...], dict[int, Hypothesis]]


def candidates(active: Sequence[int], beams: Sequence[list[Hypothesis]]) -> Candidates:
    """Distinct hypotheses (exact token match, the EOS included), with each passage's beam result."""
    found: Candidates = {}
    for j, hyps in zip(active, beams, strict=True):
        for h in hyps:
            found.setdefault(tuple(h.scored_ids), {})[j] = h
    return found


def rescoring_rows(active: Sequence[int], found: Candidates) -> list[tuple[int, tuple[int, ...]]]:
    """(passage, candidate) of every "thorough" rescoring row, candidate-major."""
    return [(j, key) for key in found for j in active]


@dataclass
class Radix:
    """The candidates as a radix tree: rescoring computes each shared prefix once per passage."""

    edges: list[tuple[int, tuple[int, ...]]]  # (parent edge or -1, tokens), parents first
    paths: list[list[int]]  # per candidate (in order), the edges from the root to it

    @classmethod
    def of(cls, keys: Sequence[tuple[int, ...]]) -> Radix:
        trie: dict = {}
        for c, key in enumerate(keys):
            node = trie
            for t in key:
                node = node.setdefault(t, {})
            node.setdefault(None, []).append(c)  # candidates ending here
        edges: list[tuple[int, tuple[int, ...]]] = []
        paths: list[list[int]] = [[] for _ in keys]
        stack: list[tuple[dict, int, list[int]]] = [(trie, -1, [])]
        while stack:
            node, parent, path = stack.pop()
            for t, child in node.items():
                if t is None:
                    continue
                tokens = [t]
                while None not in child and len(child) == 1:
                    ((t, child),) = child.items()
                    tokens.append(t)
                edges.append((parent, tuple(tokens)))
                here = [*path, len(edges) - 1]
                for c in child.get(None, []):
                    paths[c] = here
                stack.append((child, len(edges) - 1, here))
        return cls(edges, paths)

    def has_children(self) -> list[bool]:
        out = [False] * len(self.edges)
        for parent, _ in self.edges:
            if parent >= 0:
                out[parent] = True
        return out


def thorough_table(
    flat: Sequence[np.ndarray], active: Sequence[int], found: Candidates, k: int
) -> list[np.ndarray]:
    """Per candidate, K x N log-probs from the rescoring rows' results (in `rescoring_rows` order);
    passages without a beam search (a -inf prior) keep rows of 0 that the prior removes."""
    lps = []
    for c, key in enumerate(found):
        lp = np.zeros((k, len(key)))  # K x N
        lp[list(active)] = np.stack(flat[c * len(active) : (c + 1) * len(active)])
        lps.append(lp)
    return lps


def thorough_logprobs(
    generator: Generator, prompts: list[list[int]], active: Sequence[int], found: Candidates, k: int
) -> list[np.ndarray]:
    """ "thorough": every candidate scored under every passage (one batched pass)."""
    rows = rescoring_rows(active, found)
    flat = continuation_logprobs(generator, [prompts[j] for j, _ in rows], [c for _, c in rows])
    return thorough_table(flat, active, found, k)


def fast_logprobs(found: Candidates, k: int) -> list[np.ndarray]:
    """ "fast": a candidate's log-probs under passage j are its beam's, or log 0 where passage j's
    beams did not produce it."""
    lps = []
    for key, by_passage in found.items():
        lp = np.full((k, len(key)), -np.inf)  # K x N
        for j, h in by_passage.items():
            lp[j] = h.token_logprobs
        lps.append(lp)
    return lps


def marginalize(
    found: Candidates, lps: list[np.ndarray], log_prior: np.ndarray, num_return_sequences: int
) -> SequenceAnswer:
    """The answer with the highest log p(y|x) = logsumexp_j [log prior_j + sum_i lp_j[i]], and the
    best `num_return_sequences` candidates ranked (log_prior: normalised, K)."""
    keys = list(found)
    marginals = [logsumexp(log_prior + lp.sum(axis=1), axis=0) for lp in lps]
    best = int(np.argmax(marginals))  # first on ties
    lp = lps[best]
    mix = sequence_mixture(lp, log_prior)
    hyp = next(iter(found[keys[best]].values()))
    order = sorted(range(len(keys)), key=lambda c: (-marginals[c], c))[:num_return_sequences]
    ranked = [
        RankedSequence(list(keys[c]), float(marginals[c]), sequence_posterior(lps[c], log_prior))
        for c in order
    ]
    return SequenceAnswer(
        ids=list(keys[best]),
        logprob=mix.logprob,
        token_logprobs=mix.token_logprobs,
        responsibilities=softmax(prefix_log_joint(lp, log_prior), axis=0).T,  # N x K
        posterior=mix.posterior,
        finish_reason="eos" if hyp.finished else "length",
        candidates=len(keys),
        ranked=ranked,
    )
