"""Requests inside the engine: each kind is rows of the running batch with its own bookkeeping.

- `TokenRequest` (RAG-Token, Concat): K (or 1) prompt rows prefilled, then decoded together; the
  mixture kernel picks one token per request per step.
- `SequenceRequest` (RAG-Sequence): the active passages' prompts prefilled, then every passage's
  beams are rows; after the beams end, "thorough" rescoring is more prefill rows; the answer is
  streamed at the end.
- `ScoreRequest`: prefill rows only (prompt + answer), log-probs of the answer tokens.

Only the engine thread touches a request's state after admission; `emit` hands events (or an
exception, or the Score result) back to the asyncio side thread-safely.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ragmix.engine import kv
from ragmix.engine.detokenize import IncrementalDetokenizer, StopMatcher
from ragmix.engine.outputs import (
    DoneEvent,
    FinishReason,
    RetrievedPassage,
    ScoredSequence,
    Timings,
    TokenEvent,
    Usage,
)
from ragmix.engine.params import DecodingParams, Mixture
from ragmix.engine.prefill import PrefillRow
from ragmix.engine.prompts import PromptTokens
from ragmix.engine.score import ScoreResult, score_result
from ragmix.engine.sequence import (
    BeamState,
    Candidates,
    Radix,
    SequenceAnswer,
    candidates,
    fast_logprobs,
    marginalize,
    thorough_table,
)

Sink = Callable[[object], None]  # thread-safe: an Event, a ScoreResult or an exception


@dataclass(eq=False)
class Request:
    """What every kind shares: identity, its sink, its prompts, its rows and timings."""

    id: str
    emit: Sink
    prompts: list[PromptTokens]  # the prompt rows it prefills first
    arrival: float  # perf_counter at arrival
    retrieval_ms: float
    max_new_tokens: int  # the most tokens a decode row gains (0: never decodes)
    max_rows: int  # the most decode rows it holds at once (admission reserves these)
    cancelled: bool = False
    prefill: list[PrefillRow] = field(default_factory=list)  # rows being prefilled, in order
    slots: list[int] = field(default_factory=list)  # its decode rows in the running batch
    admitted: float = 0.0
    prefill_ms: float = 0.0
    cached_prompt_tokens: int = 0
    outbox: list[object] = field(default_factory=list)  # events of this step, sent after it

    def flush(self) -> None:
        """Send this step's events: after the step, so a client that sees a token sees the
        engine's state after it."""
        for item in self.outbox:
            self.emit(item)
        self.outbox.clear()

    @property
    def rows(self) -> int:
        """Decode rows it holds."""
        return len(self.slots)

    @property
    def max_length(self) -> int:
        """The longest a row of this request can grow: its longest prompt + new tokens."""
        return max(len(p.ids) for p in self.prompts) + self.max_new_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def prefilled(self) -> bool:
        return all(r.finished for r in self.prefill)

    @property
    def starts_decoding(self) -> bool:
        """Whether finishing its prefill rows starts its decoding (not Score, not rescoring)."""
        return False

    def prefill_done(self, now: float) -> None:
        self.prefill_ms = (now - self.admitted) * 1e3


@dataclass(eq=False)
class TokenRequest(Request):
    """RAG-Token or Concat: one token per step for all its rows, streamed as it is chosen."""

    mixture: Mixture = Mixture.TOKEN
    decoding: DecodingParams = field(default_factory=DecodingParams)
    passages: list[RetrievedPassage] = field(default_factory=list)
    log_prior: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))  # rows
    decode_text: Callable[[list[int]], str] = lambda ids: ""
    eos_ids: frozenset[int] = frozenset()
    rng: np.random.Generator = field(init=False)
    # Decoding state, owned by the engine thread.
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    seq_logp: np.ndarray = field(init=False)  # rows, float64: sum_i log p_j(y_i | x, z_j, y_<i)
    first_token: float = 0.0
    last_token_time: float = 0.0
    finish_reason: str = ""
    final_posterior: list[float] | None = None  # set by RAG-Sequence, which knows it up front
    sequences: list[ScoredSequence] = field(default_factory=list)  # RAG-Sequence candidates
    _uniform: float | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.decoding.seed)
        self.seq_logp = np.zeros(len(self.prompts), np.float64)
        self._detok = IncrementalDetokenizer(self.decode_text)
        self._stop = StopMatcher(self.decoding.stop)

    @property
    def starts_decoding(self) -> bool:
        return not self.tokens

    def draw(self) -> float:
        """The U(0,1) for the next token, from the request's own seeded generator. Drawn once per
        token: a step that is thrown away and run again sees the same number."""
        if self.decoding.greedy:
            return 0.5
        if self._uniform is None:
            self._uniform = float(self.rng.random())
        return self._uniform

    def on_token(
        self,
        token: int,
        logprob: float,
        responsibility: np.ndarray,  # rows
        row_logprob: np.ndarray,  # rows: log p_j(token | x, z_j, y_<i)
        top: list[tuple[int, str, float]],
    ) -> bool:
        """Record the chosen token and stream it; True when the request is finished."""
        now = time.perf_counter()
        if not self.tokens:
            self.first_token = now
        self.last_token_time = now
        self._uniform = None
        self.tokens.append(token)
        if self.mixture is Mixture.TOKEN:
            self.seq_logp += np.where(np.isfinite(self.log_prior), row_logprob, 0.0)
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
        self.outbox.append(TokenEvent(token, piece, float(logprob), resp, top))
        if finish is not None:
            self.finish_reason = finish.name.lower()
            self.outbox.append(self._done(finish, now))
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
            return [1.0 / len(z)] * len(z)
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


@dataclass(eq=False)
class SequenceRequest(TokenRequest):
    """RAG-Sequence: beam search per passage as batch rows, then marginalisation (sequence.py)."""

    norm_prior: np.ndarray = field(default_factory=lambda: np.zeros(1))  # K, float64, normalised
    active: list[int] = field(default_factory=list)  # passages with a prior > 0
    beams: list[BeamState] = field(default_factory=list)  # one per active passage
    row_beam: list[int] = field(default_factory=list)  # per decode row: its index into `beams`
    steps: int = 0  # beam steps taken
    prompt_kv: list[kv.Pieces] = field(default_factory=list)  # per active passage
    found: Candidates = field(default_factory=dict)
    radix: list[Radix] = field(default_factory=list)  # per active passage: what it rescores
    edge_rows: list[list[PrefillRow]] = field(default_factory=list)  # per active passage, edge

    @property
    def starts_decoding(self) -> bool:
        return self.steps == 0

    @property
    def thorough(self) -> bool:
        return not self.decoding.fast_sequence_decoding

    def advance(self, logp: np.ndarray, eos: np.ndarray) -> tuple[list[int], list[int]]:
        """One beam step over this request's rows (logp: rows x V, rows grouped by beam state);
        returns the parent row and the appended token of every next row."""
        num_beams = self.decoding.num_beams
        last = self.steps + 1 == self.decoding.max_new_tokens
        parents: list[int] = []
        tokens: list[int] = []
        row_beam: list[int] = []
        offset = 0
        for b, state in enumerate(self.beams):
            width = self.row_beam.count(b)
            if state.done:
                offset += width
                continue
            up, toks = state.advance(
                logp[offset : offset + width], self.steps, last, eos, num_beams
            )
            if not state.done:
                parents += [offset + p for p in up]
                tokens += toks
                row_beam += [b] * len(up)
            offset += width
        self.steps += 1
        self.row_beam = row_beam
        return parents, tokens

    def beams_done(self) -> bool:
        return all(s.done for s in self.beams)

    def rescoring_prefill(self) -> list[PrefillRow]:
        """Thorough rescoring: every candidate under every passage, as prefill rows.

        A candidate that passage j's own beams produced keeps the log-probs its beam computed
        under j (the same numbers); the others form, per passage, a radix tree (shared prefixes,
        e.g. another passage's beams, computed once): one row per edge, continuing from its
        parent edge's KV, or for the first edges from the passage's prompt KV; every row first
        recomputes the token before its edge, whose logits predict the edge's first token.
        """
        self.found = candidates(self.active, [s.finished for s in self.beams])
        self.radix, self.edge_rows = [], []
        for a, j in enumerate(self.active):
            radix = Radix.of([key for key, by in self.found.items() if j not in by])
            inner = radix.has_children()
            rows: list[PrefillRow] = []
            for e, (parent, tokens) in enumerate(radix.edges):
                if parent < 0:
                    before, prefix = self.prompts[j].ids[-1], kv.drop_last(self.prompt_kv[a])
                    up = None
                else:
                    before, prefix, up = radix.edges[parent][1][-1], [], rows[parent]
                rows.append(
                    PrefillRow(
                        [before, *tokens],
                        prefix,
                        scored=len(tokens),
                        keep_kv=inner[e],
                        parent=up,
                        source=self.prompts[j].source,
                    )
                )
            self.radix.append(radix)
            self.edge_rows.append(rows)
        # Depth first, then the longest: a chunk pads its rows to the longest piece, so rows
        # of like length go together (a parent always comes before its children).
        depth: dict[int, int] = {}
        for row in (r for rows in self.edge_rows for r in rows):
            depth[id(row)] = 0 if row.parent is None else depth[id(row.parent)] + 1
        flat = [row for rows in self.edge_rows for row in rows]
        return sorted(flat, key=lambda r: (depth[id(r)], -len(r.tokens)))

    def _rescored(self) -> list[np.ndarray]:
        """log p(c_t | x, z_j, c_<t) of every candidate under every active passage, in
        `rescoring_rows` order (candidate-major, then passage)."""
        out = []
        seen = [0] * len(self.active)  # per passage: candidates its radix tree holds so far
        for by in self.found.values():
            for a, j in enumerate(self.active):
                if j in by:
                    out.append(np.asarray(by[j].token_logprobs, np.float64))
                    continue
                path = self.radix[a].paths[seen[a]]
                seen[a] += 1
                out.append(np.concatenate([self.edge_rows[a][e].logprobs for e in path]))
        return out

    def answer(self) -> SequenceAnswer:
        """Marginalise over the candidates: rescored (thorough) or as the beams scored them."""
        k = len(self.prompts)
        if self.thorough:
            lps = thorough_table(self._rescored(), self.active, self.found, k)
        else:
            self.found = candidates(self.active, [s.finished for s in self.beams])
            lps = fast_logprobs(self.found, k)
        return marginalize(self.found, lps, self.norm_prior, self.decoding.num_return_sequences)

    def stream_answer(self, answer: SequenceAnswer) -> None:
        """Stream the chosen answer token by token, then Done with the ranked candidates."""
        self.final_posterior = [float(p) for p in answer.posterior]
        self.sequences = [
            ScoredSequence(
                # A trailing partial UTF-8 character is not text (the stream holds it back too).
                self.decode_text([t for t in c.ids if t not in self.eos_ids]).rstrip("\ufffd"),
                c.ids,
                c.logprob,
                [float(p) for p in c.posterior],
            )
            for c in answer.ranked
        ]
        rows = np.zeros(len(self.prompts))
        for i, token in enumerate(answer.ids):
            lp = float(answer.token_logprobs[i])
            if self.on_token(token, lp, answer.responsibilities[i], rows, []):
                return


@dataclass(eq=False)
class ScoreRequest(Request):
    """log p(answer | question) under TOKEN, SEQUENCE and CONCAT: K passage rows + a Concat row."""

    answer_ids: list[int] = field(default_factory=list)
    norm_prior: np.ndarray = field(default_factory=lambda: np.zeros(1))  # K, float64

    def result(self) -> ScoreResult:
        lp = np.stack([np.array(r.logprobs) for r in self.prefill])  # K+1 x N
        return score_result(self.answer_ids, lp, self.norm_prior)
