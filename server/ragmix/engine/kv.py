"""The KV cache of the running batch: rows of different lengths in one padded tensor per layer.

Layout: every layer's key and value is [rows, kv_heads, T, head_dim]; `mask` [rows, T] marks the
slots that hold a real token, so a row may have holes (left padding from being merged with longer
rows). Positions are kept per row, so padding never shifts a token's rotary/absolute position.
Rows of one request are contiguous and requests keep their order, so a request is a row range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ragmix.models.generator import positions_from_mask

if TYPE_CHECKING:
    from ragmix.models.generator import Generator


@dataclass
class Batch:
    past: list[np.ndarray]  # 2*layers x [rows, kv_heads, T, head_dim]
    mask: np.ndarray  # rows x T, int64
    next_pos: np.ndarray  # rows, int64: position of the token fed next
    last: np.ndarray  # rows, int64: token fed next

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
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


def prefill(
    generator: Generator,
    prompts: Sequence[Sequence[int]],
    prefixes: Sequence[list[np.ndarray] | None] | None = None,
) -> tuple[np.ndarray, Batch]:
    """Run the prompts in one pass and return their next-token logits and KV.

    Row i continues from prefixes[i] when given (the cached KV of the tokens before prompts[i],
    2*layers x [1, kv_heads, P_i, head_dim]); then only prompts[i] is computed. Cached prefixes are
    right-aligned in a past of length max P_i, new tokens right-aligned after it; the mask skips the
    padding between, and positions count only real slots, so a row computes exactly what it would
    alone. The new tokens of row i occupy the last len(prompts[i]) slots of the returned batch.
    The batch's `last` is unset (-1): the caller appends the token it picks from the logits.
    """
    n, s = len(prompts), max(len(p) for p in prompts)
    prefixes = prefixes if prefixes is not None else [None] * n
    plen = [0 if x is None else x[0].shape[2] for x in prefixes]
    p = max(plen)
    past = generator.empty_cache(n)
    if p:
        past = [np.zeros((n, a.shape[1], p, a.shape[3]), a.dtype) for a in past]
        for i, prefix in enumerate(prefixes):
            if prefix is not None:
                for layer, cached in zip(past, prefix, strict=True):
                    layer[i, :, p - plen[i] :] = cached[0]  # kv_heads x P_i x head_dim
    ids = np.zeros((n, s), np.int64)  # rows x S
    mask = np.zeros((n, p + s), np.int64)  # rows x P+S
    for i, tokens in enumerate(prompts):
        ids[i, s - len(tokens) :] = tokens
        mask[i, p - plen[i] : p] = 1
        mask[i, p + s - len(tokens) :] = 1
    positions = positions_from_mask(mask, s)  # rows x S
    logits_index = np.full((n, 1), s - 1, np.int64)  # rows x 1: the last prompt position
    logits, present = generator.forward(ids, mask, positions, past, logits_index)
    lengths = np.array([a + len(b) for a, b in zip(plen, prompts, strict=True)], np.int64)
    batch = Batch(present, mask, lengths, np.full(n, -1, np.int64))
    return logits[:, 0, :], batch  # rows x V


def row_slots(batch: Batch, row: int, start: int, length: int) -> list[np.ndarray]:
    """The KV of slots [start, start+length) of one row: 2*layers x [1, kv_heads, length, hd]."""
    return [a[row : row + 1, :, start : start + length] for a in batch.past]


def decode(generator: Generator, batch: Batch) -> np.ndarray:
    """One token step for every row: feed `last`, grow the KV by one slot, return rows x V logits."""
    n = batch.rows
    mask = np.concatenate([batch.mask, np.ones((n, 1), np.int64)], axis=1)  # rows x T+1
    logits, present = generator.forward(
        batch.last[:, None],  # rows x 1
        mask,
        batch.next_pos[:, None],  # rows x 1
        batch.past,
        np.zeros((n, 1), np.int64),
    )
    batch.past, batch.mask = present, mask
    batch.next_pos = batch.next_pos + 1
    return logits[:, 0, :]  # rows x V


def _left_pad(a: np.ndarray, axis: int, width: int) -> np.ndarray:
    if width == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (width, 0)
    return np.pad(a, pad)


def concat(a: Batch, b: Batch) -> Batch:
    """Rows of a, then rows of b; the shorter side is left-padded (masked) to the common length."""
    if a.rows == 0:
        return b
    if b.rows == 0:
        return a
    t = max(a.length, b.length)
    past = [
        np.concatenate([_left_pad(x, 2, t - a.length), _left_pad(y, 2, t - b.length)], axis=0)
        for x, y in zip(a.past, b.past, strict=True)
    ]
    mask = np.concatenate([_left_pad(a.mask, 1, t - a.length), _left_pad(b.mask, 1, t - b.length)])
    return Batch(
        past, mask, np.concatenate([a.next_pos, b.next_pos]), np.concatenate([a.last, b.last])
    )


def select(batch: Batch, rows: np.ndarray) -> Batch:
    """Keep `rows` (in order) and drop leading slots that no kept row uses, so T shrinks again."""
    mask = batch.mask[rows]
    used = np.flatnonzero(mask.any(axis=0))
    start = int(used[0]) if used.size else mask.shape[1]
    return Batch(
        [np.ascontiguousarray(x[rows, :, start:]) for x in batch.past],
        np.ascontiguousarray(mask[:, start:]),
        batch.next_pos[rows],
        batch.last[rows],
    )
