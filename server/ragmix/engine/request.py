"""One request inside the engine: its passage rows, its decoding state and its event sink."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ragmix.engine.detokenize import IncrementalDetokenizer, StopMatcher
from ragmix.engine.outputs import (
    DoneEvent,
    Event,
    FinishReason,
    RetrievedPassage,
    Timings,
    TokenEvent,
    Usage,
)
from ragmix.engine.params import DecodingParams, Mixture
from ragmix.engine.prompts import PromptTokens


@dataclass(eq=False)
class Request:
    id: str
    mixture: Mixture
    decoding: DecodingParams
    passages: list[RetrievedPassage]
    prompts: list[PromptTokens]  # one per row: K for TOKEN, 1 for CONCAT
    log_prior: np.ndarray  # rows, float32: log p_eta(z_j|x) (0 for the single CONCAT row)
    emit: Callable[[Event | BaseException], None]  # thread-safe: hands an event to the caller
    decode_text: Callable[[list[int]], str]
    eos_ids: frozenset[int]
    arrival: float  # perf_counter at arrival
    retrieval_ms: float
    rng: np.random.Generator = field(init=False)
    cancelled: bool = False
    # Decoding state, owned by the engine thread.
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    seq_logp: np.ndarray = field(init=False)  # rows, float64: sum_i log p_j(y_i | x, z_j, y_<i)
    admitted: float = 0.0
    prefill_ms: float = 0.0
    first_token: float = 0.0
    last_token_time: float = 0.0
    cached_prompt_tokens: int = 0
    finish_reason: str = ""
    final_posterior: list[float] | None = None  # set by RAG-Sequence, which knows it up front
    sequences: list = field(default_factory=list)  # RAG-Sequence: ranked candidates for Done

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.decoding.seed)
        self.seq_logp = np.zeros(len(self.prompts), np.float64)
        self._detok = IncrementalDetokenizer(self.decode_text)
        self._stop = StopMatcher(self.decoding.stop)

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def max_prompt_tokens(self) -> int:
        return max(len(p.ids) for p in self.prompts)

    @property
    def remaining_tokens(self) -> int:
        return self.decoding.max_new_tokens - len(self.tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def draw(self) -> float:
        """This step's U(0,1) for sampling, from the request's own seeded generator."""
        return float(self.rng.random()) if not self.decoding.greedy else 0.5

    def on_token(
        self,
        token: int,
        logprob: float,
        responsibility: np.ndarray,  # rows
        top: list[tuple[int, str, float]],
    ) -> bool:
        """Record the chosen token and stream it; True when the request is finished."""
        now = time.perf_counter()
        if not self.tokens:
            self.first_token = now
        self.last_token_time = now
        self.tokens.append(token)
        if self.mixture is Mixture.TOKEN:
            with np.errstate(divide="ignore", invalid="ignore"):
                # r_j = pi_j p_j(y) / p_mix(y)  =>  log p_j(y) = log r_j + log p_mix(y) - log pi_j
                row = np.log(responsibility.astype(np.float64)) + logprob - self.log_prior
            self.seq_logp += np.where(np.isfinite(self.log_prior), row, 0.0)
        finish: FinishReason | None = None
        if token in self.eos_ids:
            piece, finish = self._stop.flush(), FinishReason.EOS
        else:
            piece, stopped = self._stop.push(self._detok.push(token))
            if stopped:
                finish = FinishReason.STOP
            elif len(self.tokens) >= self.decoding.max_new_tokens:
                piece, finish = piece + self._stop.flush(), FinishReason.LENGTH
        self.text.append(piece)
        resp = [] if self.mixture is Mixture.CONCAT else [float(r) for r in responsibility]
        self.emit(TokenEvent(token, piece, float(logprob), resp, top))
        if finish is not None:
            self.finish_reason = finish.name.lower()
            self.emit(self._done(finish, now))
        return finish is not None

    def posterior(self) -> list[float]:
        """p(z_j | x, y) = softmax_j(log pi_j + sum_i log p_j(y_i)); empty for CONCAT."""
        if self.mixture is Mixture.CONCAT:
            return []
        if self.final_posterior is not None:
            return self.final_posterior
        z = self.log_prior.astype(np.float64) + self.seq_logp
        m = np.max(z)
        if not math.isfinite(m):
            return [1.0 / self.rows] * self.rows
        p = np.exp(z - m)
        return (p / p.sum()).tolist()

    def _done(self, finish: FinishReason, now: float) -> DoneEvent:
        ms = lambda t: (t - self.arrival) * 1e3  # noqa: E731
        return DoneEvent(
            finish,
            "".join(self.text),
            Usage(self.prompt_tokens, self.cached_prompt_tokens, len(self.tokens)),
            Timings(
                retrieval_ms=self.retrieval_ms,
                queue_ms=ms(self.admitted) - self.retrieval_ms,
                prefill_ms=self.prefill_ms,
                first_token_ms=ms(self.first_token),
                total_ms=ms(now),
            ),
            self.posterior(),
            self.sequences,
        )
