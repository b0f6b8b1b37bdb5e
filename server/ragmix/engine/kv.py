"""The KV cache as slots: each row's keys and values are the prefix [0, length) of its own row.

Layout: every layer's key and value is one buffer [rows, kv_heads, capacity, head_dim]; row i
holds `lengths[i]` slots, from slot 0 on, with nothing in between (the layout GroupQueryAttention
reads: per-row sequence lengths, right padding). A pass over rows of new tokens writes their keys
and values in place at slots [length, length + new) of each row (the generator binds the buffers
as both past and present), so a decode step copies nothing; a row joining, leaving or taking a
cached prefix copies that row's slots at most. Slots no row holds are zeros (the chunk graph reads
the whole capacity, masked, so every slot must be finite). Capacity grows in chunks (GROW at
least).

The engine core keeps its decode rows in a RunningBatch (rows.py) of this layout; the prefill
pass (`run_rows`), the standalone beam search and scoring use the helpers here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ragmix.models import arrays

if TYPE_CHECKING:
    from ragmix.models.generator import Generator

GROW = 64  # spare slots allocated at a time
Pieces = list[list[np.ndarray]]  # a row's KV in consecutive pieces, 2*layers x [1, h, n_i, hd]


@dataclass
class Batch:
    past: list[np.ndarray]  # 2*layers x [rows, kv_heads, capacity, head_dim]
    lengths: np.ndarray  # rows, int64: slots each row holds (= position of the token fed next)
    last: np.ndarray  # rows, int64: token fed next

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.past[0].shape[2]) if self.past else 0

    @classmethod
    def empty(cls, generator: Generator) -> Batch:
        return cls(generator.new_cache(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass
class Pass:
    """One pass over rows of new tokens: the logits asked for, and the rows' KV (prefix + new)."""

    logits: np.ndarray  # rows x W x V
    cache: list[np.ndarray]  # 2*layers x [rows, kv_heads, P + S, head_dim]
    prefix_lengths: list[int]
    counts: list[int]  # real new tokens per row

    def new_slots(self, row: int, n: int) -> list[np.ndarray]:
        """A copy of row `row`'s last n new tokens' KV: 2*layers x [1, kv_heads, n, head_dim]."""
        end = self.prefix_lengths[row] + self.counts[row]
        return [np.ascontiguousarray(a[row : row + 1, :, end - n : end]) for a in self.cache]


def run_rows(
    generator: Generator,
    tokens: Sequence[Sequence[int]],
    prefixes: Sequence[Pieces],
    logits_at: Sequence[Sequence[int]],
    sources: Sequence[int] | None = None,
) -> Pass:
    """One pass over rows of new tokens, row i continuing from prefixes[i] (its KV so far).

    prefixes[i]: the row's KV as pieces (possibly none), copied to the start of its row of a
    pass cache; the tokens follow at once, right-padded to the longest row (padding comes after a
    row's real tokens, so causality keeps them out of its real tokens' attention). logits_at[i]:
    indices into tokens[i] (non-empty) whose next-token logits are wanted; the logits come back
    rows x W x V (W = the longest logits_at; shorter lists repeat their last index).
    sources[i]: an encoder-decoder row's encoder tokens (its first slots; see models/seq2seq.py).
    """
    n, s = len(tokens), max(len(t) for t in tokens)
    plen = [pieces_len(x) for x in prefixes]
    cache = generator.new_cache(n, max(plen) + s)
    for i, prefix in enumerate(prefixes):
        write_pieces(cache, i, 0, prefix)
    ids = np.full((n, s), generator.pad_token_id, np.int64)  # rows x S
    width = max(len(w) for w in logits_at)
    logits_index = np.empty((n, width), np.int64)  # rows x W
    for i, row in enumerate(tokens):
        ids[i, : len(row)] = row
        at = np.asarray(logits_at[i], np.int64)
        logits_index[i, : at.size] = at
        logits_index[i, at.size :] = at[-1]
    src = np.zeros(n, np.int64) if sources is None else np.asarray(sources, np.int64)
    logits = generator.forward(ids, np.array(plen, np.int64), logits_index, cache, src)
    return Pass(logits, cache, plen, [len(t) for t in tokens])


def prefill(generator: Generator, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, Batch]:
    """Run whole prompts in one pass: their next-token logits (rows x V) and their KV as a batch
    with GROW spare slots (the new tokens of row i are its first len(prompts[i]) slots)."""
    lengths = np.array([len(p) for p in prompts], np.int64)
    cache = generator.new_cache(len(prompts), int(lengths.max()) + GROW)
    ids = np.full((len(prompts), int(lengths.max())), generator.pad_token_id, np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    logits = generator.forward(ids, np.zeros_like(lengths), (lengths - 1)[:, None], cache)
    return logits[:, 0, :], Batch(cache, lengths, np.full(len(prompts), -1, np.int64))


def pieces_len(pieces: Pieces) -> int:
    return sum(p[0].shape[2] for p in pieces)


def write_pieces(buffers: list[Any], row: int, start: int, pieces: Pieces) -> None:
    """Write a row's pieces into every buffer's row `row`, from slot `start` on (host pieces
    into device buffers are copied up)."""
    for piece in pieces:
        n = piece[0].shape[2]
        for buf, layer in zip(buffers, piece, strict=True):
            buf[row, :, start : start + n] = arrays.like(buf, layer[0])  # kv_heads x n x hd
        start += n


def join(pieces: Pieces, length: int | None = None) -> list[np.ndarray]:
    """The first `length` slots (default all) of a row's pieces as one KV (a copy)."""
    total = pieces_len(pieces) if length is None else length
    out = [np.empty((1, a.shape[1], total, a.shape[3]), a.dtype) for a in pieces[0]]
    start = 0
    for piece in pieces:
        n = min(piece[0].shape[2], total - start)
        if n <= 0:
            break
        for buf, layer in zip(out, piece, strict=True):
            buf[:, :, start : start + n] = layer[:, :, :n]
        start += n
    return out


def drop_last(pieces: Pieces) -> Pieces:
    """The row's pieces without its last slot (views, no copy)."""
    *head, last = pieces
    if last[0].shape[2] == 1:
        return head
    return [*head, [a[:, :, :-1] for a in last]]


def row_kv(batch: Batch, row: int) -> list[np.ndarray]:
    """A copy of one row's slots: 2*layers x [1, kv_heads, length, head_dim]."""
    n = int(batch.lengths[row])
    return [np.ascontiguousarray(a[row : row + 1, :, :n]) for a in batch.past]


def row_slots(batch: Batch, row: int, start: int, length: int) -> list[np.ndarray]:
    """The KV of slots [start, start+length) of one row: 2*layers x [1, kv_heads, length, hd]."""
    return [a[row : row + 1, :, start : start + length] for a in batch.past]


def decode(generator: Generator, batch: Batch) -> np.ndarray:
    """One token step for every row: feed `last`, its KV lands at slot `length` (in place);
    returns logits rows x V."""
    reserve(batch, int(batch.lengths.max()) + 1 if batch.rows else 0)
    n = batch.rows
    logits = generator.forward(
        batch.last[:, None], batch.lengths, np.zeros((n, 1), np.int64), batch.past
    )
    batch.lengths = batch.lengths + 1
    return logits[:, 0, :]  # rows x V


def reserve(batch: Batch, slots: int) -> None:
    """Room for `slots` slots in every row (a copy of the rows' slots when capacity grows)."""
    if slots <= batch.capacity:
        return
    cap = max(slots + GROW, batch.capacity + batch.capacity // 2)
    used = int(batch.lengths.max()) if batch.rows else 0
    past = [np.zeros((a.shape[0], a.shape[1], cap, a.shape[3]), a.dtype) for a in batch.past]
    for buf, old in zip(past, batch.past, strict=True):
        buf[:, :, :used] = old[:, :, :used]
    batch.past = past


def select(batch: Batch, rows: np.ndarray) -> Batch:
    """Keep `rows` (in order, repeats allowed): a new batch holding copies of their slots."""
    lengths = batch.lengths[rows]
    used = int(lengths.max()) if lengths.size else 0
    past = [np.zeros((len(rows), a.shape[1], used + GROW, a.shape[3]), a.dtype) for a in batch.past]
    for buf, old in zip(past, batch.past, strict=True):
        buf[:, :, :used] = old[rows, :, :used]
    return Batch(past, lengths, batch.last[rows])
