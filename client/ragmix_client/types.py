"""Typed results of the SDK: plain dataclasses, so callers never handle protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from ragmix_client._proto import ragmix_pb2 as pb

MIXTURES = {
    "token": pb.MIXTURE_TOKEN,
    "sequence": pb.MIXTURE_SEQUENCE,
    "concat": pb.MIXTURE_CONCAT,
}
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
}


class RagmixError(Exception):
    """Any failed call: `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float  # inner product d(z)·q(x)
    prior: float  # p(z|x) over the K passages

    @classmethod
    def from_pb(cls, m: pb.Passage) -> Passage:
        return cls(m.id, m.title, m.text, m.score, m.prior)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    responsibilities: list[float]  # r_ij over the K passages


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "length" | "eos" | "stop"
    text: str
    usage: Usage
    posterior: list[float]  # p(z_j | x, y)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Passages:
    passages: list[Passage]


Event = Passages | Token | Done


@dataclass(frozen=True)
class Answer:
    """The finished result of `generate_text`."""

    text: str
    passages: list[Passage]
    tokens: list[Token]
    done: Done


@dataclass(frozen=True)
class Info:
    version: str
    generator: str
    encoder: str
    index: str
    passages: int
    max_top_k: int
    max_new_tokens: int
    default_top_k: int
    default_max_new_tokens: int


def event_from_pb(m: pb.GenerateResponse) -> Event:
    kind = m.WhichOneof("event")
    if kind == "passages":
        return Passages([Passage.from_pb(p) for p in m.passages.passages])
    if kind == "token":
        t = m.token
        return Token(t.id, t.text, t.logprob, list(t.responsibilities))
    if kind == "done":
        d = m.done
        return Done(
            FINISH_REASONS.get(d.finish_reason, "unspecified"),
            d.text,
            Usage(d.usage.prompt_tokens, d.usage.cached_prompt_tokens, d.usage.generated_tokens),
            list(d.posterior),
            {
                "retrieval": d.timings.retrieval_ms,
                "queue": d.timings.queue_ms,
                "prefill": d.timings.prefill_ms,
                "first_token": d.timings.first_token_ms,
                "total": d.timings.total_ms,
            },
        )
    raise RagmixError(grpc.StatusCode.UNKNOWN, f"unexpected stream event {kind!r}")
