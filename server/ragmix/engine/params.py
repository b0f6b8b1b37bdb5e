"""Request parameters: one object per concern, normalised and checked in one place.

As in vLLM's SamplingParams: `__post_init__` normalises, `verify(limits)` checks every field against
the server's limits and raises one ValidationError naming the field, the allowed range and the
value. The service maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ragmix.errors import ValidationError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 200
MAX_TOP_N = 20


class Mixture(enum.IntEnum):
    """How the K passage-conditioned distributions are combined (values match the proto enum)."""

    TOKEN = 1  # RAG-Token: log-sum-exp over passages at every token
    SEQUENCE = 2  # RAG-Sequence: one latent passage for the whole answer
    CONCAT = 3  # all passages in one prompt: the baseline


@dataclass(frozen=True)
class Limits:
    """The bounds and defaults a request is checked against (ServerConfig's request limits)."""

    max_top_k: int = 20
    default_top_k: int = 5
    max_new_tokens: int = 512
    default_max_new_tokens: int = 128
    max_query_chars: int = 2000


def _fail(name: str, allowed: str, value: object) -> ValidationError:
    return ValidationError(name, f"{name} must be {allowed}, got {value!r}.")


@dataclass
class RetrievalParams:
    """What to condition on: the question and either the top-K retrieved or the given passages."""

    query: str
    top_k: int = 0
    """Passages to retrieve; 0 = the server's default_top_k. Ignored when passage_ids are given."""
    retrieval_temperature: float = 1.0
    """tau in the prior p(z|x) = softmax(d(z)·q(x) / tau); 0 = 1.0. Lower sharpens the prior."""
    passage_ids: list[str] = field(default_factory=list)
    """Condition on these passages instead of retrieving (scores still computed against the query)."""

    def __post_init__(self) -> None:
        if self.retrieval_temperature == 0:
            self.retrieval_temperature = 1.0
        self.passage_ids = list(self.passage_ids)

    def verify(self, limits: Limits) -> RetrievalParams:
        if not self.query.strip():
            raise ValidationError(
                "query", "query must be a non-empty question, got an empty string."
            )
        if len(self.query) > limits.max_query_chars:
            raise _fail(
                "query",
                f"at most {limits.max_query_chars} characters",
                f"{len(self.query)} characters",
            )
        if self.passage_ids:
            if len(self.passage_ids) > limits.max_top_k:
                raise _fail(
                    "passage_ids", f"at most {limits.max_top_k} ids", f"{len(self.passage_ids)} ids"
                )
            if len(set(self.passage_ids)) != len(self.passage_ids):
                raise ValidationError("passage_ids", "passage_ids must not repeat an id.")
            self.top_k = len(self.passage_ids)
        else:
            if self.top_k == 0:
                self.top_k = limits.default_top_k
            if not 1 <= self.top_k <= limits.max_top_k:
                raise _fail("top_k", f"in [1, {limits.max_top_k}]", self.top_k)
        t = self.retrieval_temperature
        if not (math.isfinite(t) and t > 0):
            raise _fail("retrieval_temperature", "a finite number > 0", t)
        return self


@dataclass
class DecodingParams:
    """How to pick tokens from the mixture distribution."""

    max_new_tokens: int = 0
    """Tokens to generate at most; 0 = the server's default_max_new_tokens."""
    min_new_tokens: int = 0
    """EOS is not chosen before this many tokens (each passage's distribution renormalised
    without it before mixing); 0 = no minimum. At most max_new_tokens."""
    temperature: float = 0.0
    """Applied to the mixture log-probs before sampling; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 0 is read as 1 (off)."""
    top_k: int = 0
    """Sample among the top_k most probable tokens of the mixture; 0 = off."""
    seed: int | None = None
    """Seed of this request's random generator; None = fresh entropy."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first occurrence of any of these; it is not returned."""
    num_beams: int = 0
    """Beams per passage for RAG-Sequence; 0 = 4."""
    top_n: int = 0
    """Alternatives reported per token, in [0, 20]."""
    num_return_sequences: int = 1
    """RAG-Sequence: the best candidates reported in Done (the streamed answer is the first)."""
    fast_sequence_decoding: bool = False
    """RAG-Sequence: ParlAI's "fast" marginalisation instead of "thorough" rescoring."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if self.top_p == 0:
            self.top_p = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def verify(self, limits: Limits) -> DecodingParams:
        if self.max_new_tokens == 0:
            self.max_new_tokens = limits.default_max_new_tokens
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise _fail("max_new_tokens", f"in [1, {limits.max_new_tokens}]", self.max_new_tokens)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise _fail(
                "min_new_tokens",
                f"in [0, max_new_tokens = {self.max_new_tokens}]",
                self.min_new_tokens,
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise _fail("temperature", "a finite number >= 0 (0 = greedy)", self.temperature)
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise _fail("top_p", "in (0, 1]", self.top_p)
        if self.top_k < 0:
            raise _fail("top_k", ">= 0 (0 = off)", self.top_k)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise _fail("seed", "in [0, 2^64)", self.seed)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _fail("stop", f"at most {MAX_STOP_STRINGS} strings", f"{len(self.stop)} strings")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise _fail("stop", f"non-empty strings of at most {MAX_STOP_CHARS} characters", s)
        if self.num_beams == 0:
            self.num_beams = 4
        if not 1 <= self.num_beams <= 16:
            raise _fail("num_beams", "in [1, 16]", self.num_beams)
        if self.num_return_sequences == 0:
            self.num_return_sequences = 1
        if not 1 <= self.num_return_sequences <= 16:
            raise _fail("num_return_sequences", "in [1, 16]", self.num_return_sequences)
        if not 0 <= self.top_n <= MAX_TOP_N:
            raise _fail("top_n", f"in [0, {MAX_TOP_N}]", self.top_n)
        return self
