"""Request parameters: one object per concern, normalised and checked in one place.

As in vLLM's SamplingParams: `__post_init__` normalises, `verify(limits)` checks every field against
the server's limits and raises one ValidationError naming the field, the allowed range and the
value. The service maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

from ragmix.config import ServerConfig
from ragmix.errors import ValidationError, shown
from ragmix.index.types import MAX_EF_SEARCH, MAX_NPROBE, SearchKnobs

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 200
MAX_TOP_N = 20
MAX_BEAMS = 16
MAX_RETURN_SEQUENCES = 16
INT32_MAX = 2**31 - 1
"""decoding.top_k's upper bound: the mixture kernel takes top_k as int32 (0 or >= vocab = off)."""
UINT64_MAX = 2**64 - 1
"""seed's upper bound: the proto field is uint64; numpy's generators take any such seed."""

MIN_TEMPERATURE = 1e-4
"""Smallest sampling temperature above 0. The kernel's log-probs carry an error of up to ~4e-6
(float32 exps, docs/DESIGN.md § Performance model); divided by T = 1e-4 that is 0.04 tempered nats, so the draw
is still decided by the mixture. Much below it rounding would decide, and below about 3e-39 the
kernel's float32 1/T overflows, which turns the top token's weight into 0 * inf = NaN. For anything
sharper than 1e-4 ask for 0 (greedy)."""
MAX_TEMPERATURE = 1e4
"""Largest sampling temperature: log-prob spreads of tens of nats shrink to < 0.01, i.e. uniform
sampling over the kept tokens; larger values only add float32 rounding."""
MIN_TOP_P = 1e-6
"""Smallest nucleus mass above 0. The top token alone holds at least 1/vocab of the kept mass, so
for vocabularies up to 10^6 every top_p <= 1e-6 is the same nucleus (the top token); the bound keeps
float32(top_p) > 0, which the kernel requires."""
MIN_RETRIEVAL_TEMPERATURE = 1e-4
"""Smallest tau. Retrieval scores are inner products of unit vectors, |d(z)·q(x)| <= 1, so
score / tau stays within 1e4 in float64 and `retrieval.prior`'s softmax (exp(z - max z)) is finite
and NaN-free; already at 1e-4 a score gap of 0.01 gives a prior ratio of e^-100, i.e. top-1
retrieval. (Without a bound a tau of 5e-324 makes score / tau = inf and inf - inf = NaN.)"""
MAX_RETRIEVAL_TEMPERATURE = 1e4
"""Largest tau: score spreads of at most 2 shrink to 2e-4, a prior uniform to within 0.02 %."""


class Mixture(enum.IntEnum):
    """How the K passage-conditioned distributions are combined (values match the proto enum)."""

    TOKEN = 1  # RAG-Token: log-sum-exp over passages at every token
    SEQUENCE = 2  # RAG-Sequence: one latent passage for the whole answer
    CONCAT = 3  # all passages in one prompt: the baseline


_SERVER = ServerConfig()  # the one home of every default


@dataclass(frozen=True)
class Limits:
    """The bounds and defaults a request is checked against: ServerConfig's request limits, by
    name (EngineConfig.from_server); the defaults are ServerConfig's too."""

    max_top_k: int = _SERVER.max_top_k
    default_top_k: int = _SERVER.default_top_k
    max_new_tokens: int = _SERVER.max_new_tokens
    default_max_new_tokens: int = _SERVER.default_max_new_tokens
    max_query_chars: int = _SERVER.max_query_chars


def _fail(name: str, allowed: str, value: object) -> ValidationError:
    return ValidationError(name, f"{name} must be {allowed}, got {shown(value)}.")


def _integer(name: str, value: object, lo: int, hi: int, note: str = "") -> int:
    """value as an int in the closed range [lo, hi], or a ValidationError naming name and range.

    Checked before the value can reach an array constructor: np.array([2**32 - 1], np.int32)
    raises OverflowError, which would surface as INTERNAL. bool and float are refused (a float
    would be truncated silently).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, f"an integer in [{lo}, {hi}]{note}", value)
    value = int(value)
    if not lo <= value <= hi:
        raise _fail(name, f"in [{lo}, {hi}]{note}", value)
    return value


_FLOAT32_ROUNDING = 2**-24
"""Relative error of rounding to float32. Proto float fields carry float32 values, and 1e-4 in
float32 is 9.9999997e-05: a lower bound accepts what it becomes in float32. (The upper bounds,
1 and 1e4, are exact in float32.)"""


def _in_range(value: float, lo: float, hi: float) -> bool:
    """lo <= value <= hi, lo widened by float32's rounding; False for NaN."""
    return lo * (1 - _FLOAT32_ROUNDING) <= value <= hi


def _real(name: str, value: object, lo: float, hi: float, note: str = "") -> float:
    """value as a finite float in the closed range [lo, hi] (NaN and +-inf are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, f"a number in [{lo:g}, {hi:g}]{note}", value)
    value = float(value)
    if not (math.isfinite(value) and _in_range(value, lo, hi)):
        raise _fail(name, f"in [{lo:g}, {hi:g}]{note}", value)
    return value


@dataclass
class RetrievalParams:
    """What to condition on: the question and either the top-K retrieved or the given passages."""

    query: str
    """The question x: non-empty, at most Limits.max_query_chars characters."""
    top_k: int = 0
    """Passages to retrieve, in [1, Limits.max_top_k]; 0 = the server's default_top_k. With
    passage_ids it is ignored (replaced by their count) but must still be in [0, max_top_k]."""
    retrieval_temperature: float = 1.0
    """tau in the prior p(z|x) = softmax(d(z)·q(x) / tau), in [MIN_RETRIEVAL_TEMPERATURE,
    MAX_RETRIEVAL_TEMPERATURE] = [1e-4, 1e4]; 0 = 1.0. Lower sharpens the prior."""
    passage_ids: list[str] = field(default_factory=list)
    """Condition on these passages instead of retrieving (scores still computed against the query)."""
    nprobe: int = 0
    """IVF-PQ indexes: inverted lists visited per query, in [1, nlist]; 0 = the server's."""
    ef_search: int = 0
    """HNSW indexes: candidate list size per query, in [top_k, 32768]; 0 = the server's."""

    @property
    def knobs(self) -> SearchKnobs:
        return SearchKnobs(self.nprobe, self.ef_search)

    def __post_init__(self) -> None:
        if self.retrieval_temperature == 0:
            self.retrieval_temperature = 1.0
        self.passage_ids = list(self.passage_ids)

    def verify(self, limits: Limits) -> RetrievalParams:
        if not isinstance(self.query, str):
            raise _fail("query", "a string", type(self.query).__name__)
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
            if not all(isinstance(i, str) and i for i in self.passage_ids):
                raise ValidationError("passage_ids", "passage_ids must be non-empty strings.")
            if len(set(self.passage_ids)) != len(self.passage_ids):
                raise ValidationError("passage_ids", "passage_ids must not repeat an id.")
            _integer("top_k", self.top_k, 0, limits.max_top_k, " (ignored with passage_ids)")
            self.top_k = len(self.passage_ids)
        else:
            if self.top_k == 0:
                self.top_k = limits.default_top_k
            self.top_k = _integer("top_k", self.top_k, 1, limits.max_top_k)
        self.nprobe = _integer("nprobe", self.nprobe, 0, MAX_NPROBE, " (0 = the server's)")
        self.ef_search = _integer(
            "ef_search", self.ef_search, 0, MAX_EF_SEARCH, " (0 = the server's)"
        )
        self.retrieval_temperature = _real(
            "retrieval_temperature",
            self.retrieval_temperature,
            MIN_RETRIEVAL_TEMPERATURE,
            MAX_RETRIEVAL_TEMPERATURE,
            " (0 = 1.0)",
        )
        return self


@dataclass
class DecodingParams:
    """How to pick tokens from the mixture distribution. Every numeric field has a closed range."""

    max_new_tokens: int = 0
    """Tokens to generate at most, in [1, Limits.max_new_tokens]; 0 = the server's
    default_max_new_tokens."""
    min_new_tokens: int = 0
    """EOS is not chosen before this many tokens (each passage's distribution renormalised
    without it before mixing); 0 = no minimum. In [0, max_new_tokens]."""
    temperature: float = 0.0
    """Applied to the mixture log-probs before sampling; 0 = greedy, else in
    [MIN_TEMPERATURE, MAX_TEMPERATURE] = [1e-4, 1e4]."""
    top_p: float = 1.0
    """Nucleus mass in [MIN_TOP_P, 1] = [1e-6, 1]; 0 is read as 1 (off)."""
    top_k: int = 0
    """Sample among the top_k most probable tokens of the mixture, in [0, INT32_MAX]; 0 = off (as is
    any value >= the vocabulary)."""
    seed: int | None = None
    """Seed of this request's random generator, in [0, 2^64 - 1]; None = fresh entropy."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first occurrence of any of these; it is not returned. At most
    MAX_STOP_STRINGS strings of 1 to MAX_STOP_CHARS characters."""
    num_beams: int = 0
    """Beams per passage for RAG-Sequence, in [1, 16]; 0 = 4."""
    top_n: int = 0
    """Alternatives reported per token, in [0, 20]."""
    num_return_sequences: int = 1
    """RAG-Sequence: the best candidates reported in Done (the streamed answer is the first), in
    [1, 16]; 0 = 1."""
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
        self.max_new_tokens = _integer(
            "max_new_tokens", self.max_new_tokens, 1, limits.max_new_tokens
        )
        self.min_new_tokens = _integer(
            "min_new_tokens",
            self.min_new_tokens,
            0,
            self.max_new_tokens,
            f" (max_new_tokens = {self.max_new_tokens})",
        )
        if self.temperature != 0:
            self.temperature = _real(
                "temperature",
                self.temperature,
                MIN_TEMPERATURE,
                MAX_TEMPERATURE,
                " (or 0 = greedy)",
            )
        self.temperature = float(self.temperature)
        real = isinstance(self.top_p, numbers.Real) and not isinstance(self.top_p, bool)
        if not (real and _in_range(self.top_p, MIN_TOP_P, 1.0)):  # NaN fails the comparison
            raise _fail("top_p", f"in (0, 1] and >= {MIN_TOP_P:g} (0 = off)", self.top_p)
        self.top_p = float(self.top_p)
        self.top_k = _integer("top_k", self.top_k, 0, INT32_MAX, " (0 = off)")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, 0, UINT64_MAX)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _fail("stop", f"at most {MAX_STOP_STRINGS} strings", f"{len(self.stop)} strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise _fail("stop", f"non-empty strings of at most {MAX_STOP_CHARS} characters", s)
        if self.num_beams == 0:
            self.num_beams = 4
        self.num_beams = _integer("num_beams", self.num_beams, 1, MAX_BEAMS, " (0 = 4)")
        if self.num_return_sequences == 0:
            self.num_return_sequences = 1
        self.num_return_sequences = _integer(
            "num_return_sequences", self.num_return_sequences, 1, MAX_RETURN_SEQUENCES, " (0 = 1)"
        )
        self.top_n = _integer("top_n", self.top_n, 0, MAX_TOP_N)
        return self
