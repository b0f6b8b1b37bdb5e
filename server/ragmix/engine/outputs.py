"""What the engine hands the service: plain dataclasses, one per stream event (no protobuf here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.IntEnum):
    """Why a generation ended (values match the proto enum)."""

    LENGTH = 1
    EOS = 2
    STOP = 3


@dataclass(frozen=True)
class RetrievedPassage:
    id: str
    title: str
    text: str
    score: float  # inner product d(z)·q(x)
    prior: float  # p_eta(z|x) over the K passages


@dataclass(frozen=True)
class PassagesEvent:
    passages: list[RetrievedPassage]


@dataclass(frozen=True)
class TokenEvent:
    id: int
    text: str
    logprob: float  # log p(y_i | x, y_<i) under the mixture
    responsibilities: list[float]  # r_ij over the K passages
    top: list[tuple[int, str, float]] = field(default_factory=list)  # top-n (id, text, logprob)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Timings:
    retrieval_ms: float
    queue_ms: float
    prefill_ms: float
    first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class ScoredSequence:
    text: str
    token_ids: list[int]
    logprob: float  # log p(y | x) under RAG-Sequence
    posterior: list[float]  # p(z_j | x, y)


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: FinishReason
    text: str
    usage: Usage
    timings: Timings
    posterior: list[float]  # p(z_j | x, y) over the K passages
    sequences: list[ScoredSequence] = field(default_factory=list)  # RAG-Sequence candidates


Event = PassagesEvent | TokenEvent | DoneEvent
