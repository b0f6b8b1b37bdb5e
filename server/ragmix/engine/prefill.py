"""Chunked prefill: prompt rows computed a bounded number of tokens per step, as vLLM does.

Every kind of request starts as prefill rows: a TOKEN request's K passage prompts, a Concat prompt,
a RAG-Sequence request's prompts and later its "thorough" rescoring rows, a Score request's prompt +
answer rows. A row continues from a prefix KV it was given (a cached passage, a passage's prompt)
and computes `tokens` over as many steps as the token budget needs; it can keep the logits after
its last token (decoding starts there) and the log-probs of its last `scored` tokens (Score,
rescoring). Each step `plan_chunk` picks what fits the budget; `run_chunk` computes it in one
generator pass; `commit_chunk` moves the results into the rows. Nothing here knows about requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ragmix import kernels
from ragmix.engine import kv

if TYPE_CHECKING:
    from ragmix.engine.prefix_cache import PassageCache
    from ragmix.models.generator import Generator


@dataclass(eq=False)
class PrefillRow:
    tokens: list[int]  # computed by this row, after its prefix
    prefix: kv.Pieces = field(default_factory=list)  # the KV before `tokens` (shared, not copied)
    scored: int = 0  # log p(t | before) wanted for the last `scored` tokens
    keep_logits: bool = False  # keep the logits after the last token (decoding starts there)
    keep_kv: bool = False  # keep prefix + tokens KV once done (the row joins the decode batch)
    cache_key: bytes | None = (
        None  # store the KV of the `cache_ids` (the first slots) under this key
    )
    cache_ids: Sequence[int] = ()
    parent: PrefillRow | None = None  # when given, the prefix is the parent's KV but its last slot
    source: int = 0  # encoder-decoder: the encoder's tokens, the first slots of prefix + tokens
    # Progress, written by commit_chunk only.
    done: int = 0  # tokens computed so far
    kv: kv.Pieces = field(default_factory=list)  # prefix + the tokens done (while needed)
    logprobs: list[float] = field(default_factory=list)  # of the scored tokens, in order
    logits: np.ndarray | None = None  # V: after the last token (keep_logits)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a prefill row needs at least one token to compute.")
        if not 0 <= self.scored < len(self.tokens):
            raise ValueError(
                f"scored must be in [0, {len(self.tokens) - 1}] (the first token has no "
                f"predictor in this row), got {self.scored}."
            )
        if self.fresh_source and self.scored >= len(self.tokens) - self.source:
            raise ValueError("scored tokens must come after an encoder-decoder row's source.")
        self.kv = list(self.prefix)

    @property
    def fresh_source(self) -> bool:
        """Whether its tokens start with the encoder's input (no KV before them)."""
        return self.source > 0 and not self.prefix and self.parent is None

    @property
    def ready(self) -> bool:
        """Whether its prefix is known: no parent, or the parent has finished."""
        return self.parent is None or self.parent.finished

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done

    @property
    def finished(self) -> bool:
        return self.done == len(self.tokens)

    @property
    def prefix_len(self) -> int:
        return kv.pieces_len(self.prefix)

    @property
    def first_piece(self) -> int:
        """The fewest tokens its next piece may hold: an encoder reads its whole source in one
        pass, and the first decoder token comes with it (its logits are the row's first)."""
        return self.source + 1 if self.fresh_source and self.done == 0 else 1

    @property
    def past(self) -> int:
        """Slots of KV its next piece attends to before its own tokens."""
        if self.parent is not None and self.done == 0 and not self.prefix:
            return kv.pieces_len(self.parent.kv) - 1
        return kv.pieces_len(self.kv)

    def start(self) -> None:
        """Take the parent's KV as the prefix, once it is there (before the first chunk)."""
        if self.parent is not None and self.done == 0 and not self.prefix:
            self.prefix = kv.drop_last(self.parent.kv)
            self.kv = list(self.prefix)

    def wanted(self, lo: int, hi: int) -> list[int]:
        """Indices t in [lo, hi) of `tokens` whose next-token logits this row needs."""
        n = len(self.tokens)
        first = n - self.scored - 1  # logits at t predict tokens[t + 1]
        out = list(range(max(lo, first), min(hi, n - 1))) if self.scored else []
        if self.keep_logits and lo <= n - 1 < hi:
            out.append(n - 1)
        return out


# What a pass costs beside its tokens, in tokens (measured on the default model, 2 cores): a
# row's past of this many slots costs about one token (copied into the pass, attended to: 30 rows
# x 8 tokens over 258 past slots took 572 ms where 256 tokens without a past took 420 ms), and
# logits at one position cost a fifth of a token (the output head is 28 M of the 134.5 M weights
# a token meets).
PAST_SLOTS_PER_TOKEN = 64
LOGITS_PER_TOKEN = 5


def pass_cost(rows: int, width: int, past: int, scored: bool) -> float:
    """The cost in tokens of a pass of `rows` rows padded to `width` tokens after a padded past
    of `past` slots, with logits at every position (scored) or at one."""
    logits = width if scored else 1
    return rows * (width + past / PAST_SLOTS_PER_TOKEN + logits / LOGITS_PER_TOKEN)


@dataclass
class Chunk:
    """This step's prefill work: rows[i] computes its next `counts[i]` tokens."""

    rows: list[PrefillRow]
    counts: list[int]

    @property
    def cost(self) -> float:
        """What the pass costs, in tokens (`pass_cost`): what --max-prefill-tokens bounds."""
        if not self.rows:
            return 0.0
        past = max(r.past for r in self.rows)
        return pass_cost(len(self.rows), max(self.counts), past, any(r.scored for r in self.rows))


@dataclass
class ChunkOutput:
    passed: kv.Pass  # the generator pass: logits rows x W x V and the rows' new KV
    wanted: list[list[int]]  # per row, the token indices (in the row) whose logits came back
    logprobs: np.ndarray  # float64, the scored tokens' log-probs of all rows, in row order

    @property
    def logits(self) -> np.ndarray:
        return self.passed.logits


def plan_chunk(pending: Sequence[PrefillRow], budget: int) -> Chunk:
    """The first n pending rows (FIFO) and tokens for each, with a pass cost <= budget.

    A pass pads its rows to the longest piece and the longest past (`pass_cost`), so the n that
    computes the most real tokens within the budget wins (the smallest such n); each row gets
    min(its remaining, width) tokens. The first row always gets at least its first piece (one
    token; an encoder-decoder row's source and first decoder token), and no row gets less.
    """
    best_n, best_width, best_useful = 0, 0, 0
    longest = past = need = 0
    scored = False
    for n, row in enumerate(pending, 1):
        longest, past = max(longest, row.remaining), max(past, row.past)
        need = max(need, row.first_piece)
        scored = scored or row.scored > 0
        fixed = pass_cost(n, 0, past, False) - (n / LOGITS_PER_TOKEN if scored else 0)
        per_token = n * (1 + (1 / LOGITS_PER_TOKEN if scored else 0))
        width = min(longest, int((budget - fixed) // per_token))
        if width < need:
            if n == 1:
                best_n, best_width = 1, need  # progress, whatever the budget
            break
        useful = sum(min(r.remaining, width) for r in pending[:n])
        if useful > best_useful:
            best_n, best_width, best_useful = n, width, useful
    rows = list(pending[:best_n])
    return Chunk(rows, [min(r.remaining, best_width) for r in rows])


def run_chunk(generator: Generator, chunk: Chunk) -> ChunkOutput:
    """One generator pass over the chunk's pieces; the rows are not changed (see commit_chunk)."""
    pieces = [r.tokens[r.done : r.done + n] for r, n in zip(chunk.rows, chunk.counts, strict=True)]
    wanted = [r.wanted(r.done, r.done + n) for r, n in zip(chunk.rows, chunk.counts, strict=True)]
    logits_at = [
        [t - r.done for t in w] or [n - 1]
        for r, w, n in zip(chunk.rows, wanted, chunk.counts, strict=True)
    ]
    for r in chunk.rows:
        r.start()
    sources = [r.source for r in chunk.rows]
    passed = kv.run_rows(generator, pieces, [r.kv for r in chunk.rows], logits_at, sources)
    return ChunkOutput(passed, wanted, scored_logprobs(passed.logits, chunk.rows, wanted))


def scored_logprobs(
    logits: np.ndarray, rows: Sequence[PrefillRow], wanted: Sequence[list[int]]
) -> np.ndarray:
    """log p(tokens[t + 1]) at every wanted, scored position of every row: one kernel call."""
    picked, targets = [], []
    for i, (row, w) in enumerate(zip(rows, wanted, strict=True)):
        for slot, t in enumerate(w):
            if t + 1 < len(row.tokens):  # the last token's logits predict nothing scored
                picked.append(logits[i, slot])
                targets.append(row.tokens[t + 1])
    if not picked:
        return np.zeros(0)
    lp = kernels.row_logprobs(np.stack(picked), np.array(targets, np.int64))  # scored tokens
    return lp.astype(np.float64)


def commit_chunk(chunk: Chunk, out: ChunkOutput, cache: PassageCache | None) -> None:
    """Advance each row by its piece: KV, scored log-probs, final logits, passage cache entries."""
    offset = 0
    for i, (row, n) in enumerate(zip(chunk.rows, chunk.counts, strict=True)):
        w = out.wanted[i]
        scored = sum(1 for t in w if t + 1 < len(row.tokens))
        row.logprobs.extend(out.logprobs[offset : offset + scored].tolist())
        offset += scored
        row.done += n
        if row.keep_logits and row.finished:
            row.logits = out.logits[i, len(w) - 1].copy()  # V
        if not row.finished or row.keep_kv or row.cache_key is not None:
            row.kv = [*row.kv, out.passed.new_slots(i, n)]  # only the new slots are copied
        store = (
            cache is not None
            and row.cache_key is not None
            and row.prefix_len + row.done >= len(row.cache_ids)
        )
        if store:
            cache.put(row.cache_key, row.cache_ids, kv.join(row.kv, len(row.cache_ids)))
            row.cache_key = None
        if row.finished and not row.keep_kv:
            row.kv = []
