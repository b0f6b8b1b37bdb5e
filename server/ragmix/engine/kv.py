"""The KV cache of the running batch: rows of different lengths in one padded buffer per layer.

Layout: every layer's key and value is a buffer [rows, kv_heads, capacity, head_dim] whose first
`length` slots are in use; `mask` [rows, capacity] marks the slots that hold a real token, so a row
may have holes (left padding from being merged with longer rows). Slots past `length` are zeros and
masked: the whole buffer goes to the generator as the past without a copy, and each decode step
writes the new token's keys and values into slot `length` in place. Capacity grows in chunks, so
the cache is copied once per GROW steps instead of at every step. Positions are kept per row, so
padding never shifts a token's rotary/absolute position. The standalone beam search and scoring use
these batches; the engine core keeps its decode rows in a RunningBatch (rows.py) of the same layout
with room to spare, and uses the prefill pass (`run_rows`) and the row helpers here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ragmix.models.generator import positions_from_mask

if TYPE_CHECKING:
    from ragmix.models.generator import Generator

GROW = 64  # spare slots allocated at a time: attention reads at most this many masked slots
Pieces = list[list[np.ndarray]]  # a row's KV in consecutive pieces, 2*layers x [1, h, n_i, hd]


@dataclass
class Batch:
    past: list[np.ndarray]  # 2*layers x [rows, kv_heads, capacity, head_dim]
    mask: np.ndarray  # rows x capacity, int64
    next_pos: np.ndarray  # rows, int64: position of the token fed next
    last: np.ndarray  # rows, int64: token fed next
    length: int = 0  # slots in use

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.past)

    @classmethod
    def empty(cls, generator: Generator) -> Batch:
        return cls(
            generator.empty_cache(0),
            np.zeros((0, 0), np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )


def _buffers(like: list[np.ndarray], rows: int, capacity: int) -> list[np.ndarray]:
    return [np.zeros((rows, a.shape[1], capacity, a.shape[3]), a.dtype) for a in like]


@dataclass
class Pass:
    """One pass over rows of new tokens: the logits asked for and the new tokens' KV."""

    logits: np.ndarray  # rows x W x V
    new: list[np.ndarray]  # 2*layers x [rows, kv_heads, S, head_dim]: row i's are its last n_i
    past: list[np.ndarray]  # 2*layers x [rows, kv_heads, P, head_dim]: the prefixes, padded
    mask: np.ndarray  # rows x P+S
    prefix_lengths: list[int]

    def new_slots(self, row: int, n: int) -> list[np.ndarray]:
        """A copy of row `row`'s n new tokens' KV: 2*layers x [1, kv_heads, n, head_dim]."""
        s = self.new[0].shape[2]
        return [np.ascontiguousarray(a[row : row + 1, :, s - n :]) for a in self.new]


def run_rows(
    generator: Generator,
    tokens: Sequence[Sequence[int]],
    prefixes: Sequence[Pieces],
    logits_at: Sequence[Sequence[int]],
) -> Pass:
    """One pass over rows of new tokens, row i continuing from prefixes[i] (its KV so far).

    prefixes[i]: the row's KV as pieces (possibly none). Prefixes are right-aligned in a past of
    length max P_i, new tokens right-aligned after it; the mask skips the padding between, and
    positions count only real slots, so a row computes exactly what it would alone. logits_at[i]:
    indices into tokens[i] (non-empty) whose next-token logits are wanted; the logits come back
    rows x W x V (W = the longest logits_at; shorter lists repeat their last index).
    """
    n, s = len(tokens), max(len(t) for t in tokens)
    plen = [pieces_len(x) for x in prefixes]
    p = max(plen)
    past = generator.empty_cache(n)
    if p:
        past = [np.zeros((n, a.shape[1], p, a.shape[3]), a.dtype) for a in past]
        for i, prefix in enumerate(prefixes):
            write_pieces(past, i, p - plen[i], prefix)
    ids = np.zeros((n, s), np.int64)  # rows x S
    mask = np.zeros((n, p + s), np.int64)  # rows x P+S
    width = max(len(w) for w in logits_at)
    logits_index = np.empty((n, width), np.int64)  # rows x W
    for i, row in enumerate(tokens):
        pad = s - len(row)
        ids[i, pad:] = row
        mask[i, p - plen[i] : p] = 1
        mask[i, p + pad :] = 1
        at = np.asarray(logits_at[i], np.int64) + pad
        logits_index[i, : at.size] = at
        logits_index[i, at.size :] = at[-1]
    positions = positions_from_mask(mask, s)  # rows x S
    logits, new = generator.forward_new(ids, mask, positions, past, logits_index)
    return Pass(logits, new, past, mask, plen)


def prefill(
    generator: Generator,
    prompts: Sequence[Sequence[int]],
    prefixes: Sequence[list[np.ndarray] | None] | None = None,
) -> tuple[np.ndarray, Batch]:
    """Run whole prompts in one pass: their next-token logits (rows x V) and their KV.

    Row i continues from prefixes[i] when given (see `run_rows`). The new tokens of row i occupy the
    last len(prompts[i]) slots of the returned batch.
    """
    pieces = [[] if x is None else [x] for x in (prefixes or [None] * len(prompts))]
    out = run_rows(generator, prompts, pieces, [[len(p) - 1] for p in prompts])
    n, p, length = len(prompts), out.past[0].shape[2], out.mask.shape[1]
    buffers = _buffers(out.new, n, length + GROW)
    for buf, old, fresh in zip(buffers, out.past, out.new, strict=True):
        buf[:, :, :p] = old
        buf[:, :, p:length] = fresh
    full_mask = np.zeros((n, length + GROW), np.int64)
    full_mask[:, :length] = out.mask
    lengths = np.array([a + len(b) for a, b in zip(out.prefix_lengths, prompts, strict=True)])
    batch = Batch(buffers, full_mask, lengths.astype(np.int64), np.full(n, -1, np.int64), length)
    return out.logits[:, 0, :], batch  # rows x V


def row_kv(batch: Batch, row: int) -> list[np.ndarray]:
    """A copy of one row's real (masked-in) slots: 2*layers x [1, kv_heads, n, head_dim]."""
    used = np.flatnonzero(batch.mask[row, : batch.length])
    lo, hi = int(used[0]), int(used[-1]) + 1
    if hi - lo == used.size:  # contiguous: one slice copy
        return [np.ascontiguousarray(a[row : row + 1, :, lo:hi]) for a in batch.past]
    return [a[row : row + 1][:, :, used] for a in batch.past]


def pieces_len(pieces: Pieces) -> int:
    return sum(p[0].shape[2] for p in pieces)


def write_pieces(buffers: list[np.ndarray], row: int, start: int, pieces: Pieces) -> None:
    """Write a row's pieces into every buffer's row `row`, from slot `start` on."""
    for piece in pieces:
        n = piece[0].shape[2]
        for buf, layer in zip(buffers, piece, strict=True):
            buf[row, :, start : start + n] = layer[0]  # kv_heads x n x head_dim
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


def row_slots(batch: Batch, row: int, start: int, length: int) -> list[np.ndarray]:
    """The KV of slots [start, start+length) of one row: 2*layers x [1, kv_heads, length, hd]."""
    return [a[row : row + 1, :, start : start + length] for a in batch.past]


def decode_forward(
    generator: Generator, batch: Batch, rows: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One token step's pass for every row (or only `rows`): logits rows x V and the new KV.

    Nothing in the batch changes: `append` writes the new keys and values, so a pass that raises,
    or whose results are thrown away, leaves the cache as it was. The graph sees the whole buffer
    as the past (spare slots masked), so nothing of size rows x capacity is copied unless `rows`
    picks a subset.
    """
    past, mask, pos, last = batch.past, batch.mask, batch.next_pos, batch.last
    if rows is not None:
        past = [a[rows] for a in past]
        mask, pos, last = mask[rows], pos[rows], last[rows]
    n = mask.shape[0]
    mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)  # rows x capacity+1
    logits, new = generator.forward_new(
        last[:, None],  # rows x 1
        mask,
        pos[:, None],  # rows x 1
        past,
        np.zeros((n, 1), np.int64),
    )
    return logits[:, 0, :], new  # rows x V


def append(batch: Batch, new: list[np.ndarray]) -> None:
    """Write every row's new token KV (from `decode_forward`) into slot `length`, in place."""
    if batch.length == batch.capacity:
        _grow(batch)
    t = batch.length
    for buf, fresh in zip(batch.past, new, strict=True):
        buf[:, :, t] = fresh[:, :, 0]  # rows x kv_heads x head_dim
    batch.mask[:, t] = 1
    batch.length = t + 1
    batch.next_pos = batch.next_pos + 1


def decode(generator: Generator, batch: Batch) -> np.ndarray:
    """One token step for every row: feed `last`, write its KV into slot `length`, return logits."""
    logits, new = decode_forward(generator, batch)
    append(batch, new)
    return logits  # rows x V


def _grow(batch: Batch) -> None:
    cap = batch.capacity + GROW
    buffers = _buffers(batch.past, batch.rows, cap)
    for buf, old in zip(buffers, batch.past, strict=True):
        buf[:, :, : batch.length] = old[:, :, : batch.length]
    mask = np.zeros((batch.rows, cap), np.int64)
    mask[:, : batch.length] = batch.mask[:, : batch.length]
    batch.past, batch.mask = buffers, mask


def select(batch: Batch, rows: np.ndarray) -> Batch:
    """Keep `rows` (in order, repeats allowed) and drop leading slots that no kept row uses."""
    mask = batch.mask[rows, : batch.length]
    used = np.flatnonzero(mask.any(axis=0))
    start = int(used[0]) if used.size else batch.length
    length = batch.length - start
    buffers = _buffers(batch.past, len(rows), length + GROW)
    for buf, old in zip(buffers, batch.past, strict=True):
        buf[:, :, :length] = old[rows, :, start : batch.length]
    full_mask = np.zeros((len(rows), length + GROW), np.int64)
    full_mask[:, :length] = mask[:, start:]
    return Batch(buffers, full_mask, batch.next_pos[rows], batch.last[rows], length)
