"""Typed results of the SDK: plain frozen dataclasses, so callers never handle protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from ragmix_client.proto import ragmix_pb2 as pb

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
    """Any failed call. `code` is the gRPC status code, `message` the server's explanation
    (e.g. INVALID_ARGUMENT, "top_k must be in [1, 20], got 50.")."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> RagmixError:
        """Both grpc (sync) and grpc.aio errors carry code() and details()."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass(frozen=True)
class Passage:
    """A retrieved passage z with its retrieval score and prior p(z|x) over the K retrieved."""

    id: str
    title: str
    text: str
    score: float  # inner product d(z)·q(x) of unit vectors, in [-1, 1]
    prior: float  # p_eta(z|x) = softmax(score / retrieval_temperature)

    @classmethod
    def from_pb(cls, m: pb.Passage) -> Passage:
        return cls(m.id, m.title, m.text, m.score, m.prior)


@dataclass(frozen=True)
class Passages:
    """First stream event: the K passages the answer is conditioned on, in rank order."""

    passages: list[Passage]


@dataclass(frozen=True)
class Token:
    """One generated token. `text` may be empty while a multi-byte character is incomplete."""

    id: int
    text: str
    logprob: float  # log p(y_i | x, y_<i) under the mixture
    responsibilities: list[float]  # r_ij = p(z_j | x, y_<=i), in Passages order, sums to 1
    alternatives: list[Alternative] = field(default_factory=list)  # the top_n of the mixture

    @property
    def dominant(self) -> int:
        """Index of the passage with the largest responsibility for this token."""
        r = self.responsibilities
        return max(range(len(r)), key=r.__getitem__) if r else -1


@dataclass(frozen=True)
class Alternative:
    id: int
    text: str
    logprob: float  # log p under the mixture


@dataclass(frozen=True)
class ScoredSequence:
    """A RAG-Sequence candidate (Done.sequences, best first)."""

    text: str
    token_ids: list[int]
    logprob: float  # log p(y | x) under RAG-Sequence
    posterior: list[float]  # p(z_j | x, y)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # over all K passage rows
    cached_prompt_tokens: int  # of prompt_tokens, served from the passage prefix cache
    generated_tokens: int


@dataclass(frozen=True)
class Timings:
    """Server-side milliseconds; first_token_ms and total_ms count from request arrival."""

    retrieval_ms: float
    queue_ms: float
    prefill_ms: float
    first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class Done:
    """Last stream event: the whole answer and its posterior over the passages."""

    finish_reason: str  # "length" | "eos" | "stop"
    text: str
    usage: Usage
    timings: Timings
    posterior: list[float]  # p(z_j | x, y) of the whole answer, in Passages order
    sequences: list[ScoredSequence] = field(default_factory=list)  # mixture="sequence" only


Event = Passages | Token | Done


@dataclass(frozen=True)
class Answer:
    """The finished result of `generate_text`."""

    text: str
    passages: list[Passage]
    tokens: list[Token]
    done: Done

    @property
    def posterior(self) -> list[float]:
        """p(z_j | x, y) of the answer, aligned with `passages`."""
        return self.done.posterior


@dataclass(frozen=True)
class MixtureScore:
    """log p(y|x) of a given answer under one way of combining the passages."""

    logprob: float
    token_logprobs: list[float]  # per answer token; they sum to logprob
    posterior: list[float]  # p(z_j | x, y), K values in passage order
    responsibilities: list[list[float]]  # TOKEN only: answer tokens x K; empty otherwise

    @classmethod
    def from_pb(cls, m: pb.MixtureScore, k: int) -> MixtureScore:
        flat = list(m.responsibilities)  # row-major [answer tokens x K]
        rows = [flat[i : i + k] for i in range(0, len(flat), k)] if k else []
        return cls(m.logprob, list(m.token_logprobs), list(m.posterior), rows)


@dataclass(frozen=True)
class ScoreResult:
    """Result of `score`: the answer scored under the TOKEN, SEQUENCE and CONCAT mixtures."""

    passages: list[Passage]
    answer_token_ids: list[int]
    token: MixtureScore
    sequence: MixtureScore
    concat: MixtureScore

    @classmethod
    def from_pb(cls, m: pb.ScoreResponse) -> ScoreResult:
        k = len(m.passages)
        return cls(
            [Passage.from_pb(p) for p in m.passages],
            list(m.answer_token_ids),
            MixtureScore.from_pb(m.token, k),
            MixtureScore.from_pb(m.sequence, k),
            MixtureScore.from_pb(m.concat, k),
        )


@dataclass(frozen=True)
class Info:
    """What the server runs and the limits it enforces (GetInfo)."""

    version: str
    generator: str
    encoder: str
    index: str
    passages: int
    max_top_k: int
    max_new_tokens: int
    max_query_chars: int
    default_top_k: int
    default_max_new_tokens: int
    providers: list[str]
    max_concurrent_requests: int
    max_queued_requests: int
    index_type: str = "flat"  # "flat", "hnsw" or "ivfpq"
    replica: str = ""  # which replica answered, on a Ray Serve cluster; "" on one server
    device: str = "cpu"  # where the models run: "cpu" or "cuda:N"
    index_device: str = "cpu"  # where FAISS searches: "cpu" or "cuda:N"
    generator_architecture: str = "decoder-only"  # or "encoder-decoder" (BART, T5)
    passage_cache: bool = False  # passage prefix KV cached across requests

    @classmethod
    def from_pb(cls, m: pb.GetInfoResponse) -> Info:
        return cls(
            m.version,
            m.generator,
            m.encoder,
            m.index,
            m.passages,
            m.max_top_k,
            m.max_new_tokens,
            m.max_query_chars,
            m.default_top_k,
            m.default_max_new_tokens,
            list(m.providers),
            m.max_concurrent_requests,
            m.max_queued_requests,
            m.index_type or "flat",
            m.replica,
            m.device or "cpu",
            m.index_device or "cpu",
            m.generator_architecture or "decoder-only",
            m.passage_cache,
        )


def event_from_pb(m: pb.GenerateResponse) -> Event:
    kind = m.WhichOneof("event")
    if kind == "passages":
        return Passages([Passage.from_pb(p) for p in m.passages.passages])
    if kind == "token":
        t = m.token
        alternatives = [Alternative(a.id, a.text, a.logprob) for a in t.alternatives]
        return Token(t.id, t.text, t.logprob, list(t.responsibilities), alternatives)
    if kind == "done":
        d, t = m.done, m.done.timings
        return Done(
            FINISH_REASONS.get(d.finish_reason, "unspecified"),
            d.text,
            Usage(d.usage.prompt_tokens, d.usage.cached_prompt_tokens, d.usage.generated_tokens),
            Timings(t.retrieval_ms, t.queue_ms, t.prefill_ms, t.first_token_ms, t.total_ms),
            list(d.posterior),
            [
                ScoredSequence(c.text, list(c.token_ids), c.logprob, list(c.posterior))
                for c in d.sequences
            ],
        )
    raise RagmixError(grpc.StatusCode.UNKNOWN, f"unexpected stream event {kind!r}")


class AnswerBuilder:
    """Collects stream events into an Answer (shared by the sync and asyncio clients)."""

    def __init__(self) -> None:
        self.passages: list[Passage] = []
        self.tokens: list[Token] = []

    def add(self, ev: Event) -> Answer | None:
        if isinstance(ev, Passages):
            self.passages = ev.passages
        elif isinstance(ev, Token):
            self.tokens.append(ev)
        else:
            return Answer(ev.text, self.passages, self.tokens, ev)
        return None

    @staticmethod
    def missing_done() -> RagmixError:
        return RagmixError(grpc.StatusCode.UNKNOWN, "the stream ended without a done event")


@dataclass(frozen=True)
class NewPassage:
    """A passage to add (IndexAdmin.AddPassages); id "" = the server makes one."""

    title: str
    text: str
    id: str = ""
    source: str = ""

    def to_pb(self) -> pb.NewPassage:
        return pb.NewPassage(id=self.id, title=self.title, text=self.text, source=self.source)


@dataclass(frozen=True)
class AddResult:
    ids: list[str]  # of the added passages, in request order
    passages: int  # searchable after the change
    sequence: int  # the change log's sequence number after it


@dataclass(frozen=True)
class DeleteResult:
    deleted: list[str]
    not_found: list[str]  # never added, or already deleted
    passages: int
    sequence: int


@dataclass(frozen=True)
class IndexStats:
    """What the index holds (IndexAdmin.IndexStats)."""

    index: str
    index_type: str
    passages: int  # searchable: built + added - deleted
    vectors: int  # in FAISS, deleted ones included: built + added
    built: int
    added: int
    deleted: int
    sequence: int
    snapshot_sequence: int
    writable: bool
    max_batch_passages: int
    max_text_chars: int

    @classmethod
    def from_pb(cls, m: pb.IndexStatsResponse) -> IndexStats:
        return cls(
            m.index,
            m.index_type,
            m.passages,
            m.vectors,
            m.built,
            m.added,
            m.deleted,
            m.sequence,
            m.snapshot_sequence,
            m.writable,
            m.max_batch_passages,
            m.max_text_chars,
        )
