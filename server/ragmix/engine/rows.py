"""The running batch's decode rows, in buffers with room to spare, so rows come and go in place.

Requests join, leave and reorder their beams every few steps under load; rebuilding the batch for
each change copies every row (at 80 rows x 350 slots of the default model, 1.3 GB and ~0.35 s a
time). Here a change copies only the rows it concerns:

- leave: the freed slots are filled with the last live rows (their owners are told where they
  went), and the live count shrinks: rows [0, rows) are always the live ones;
- join: new rows are written after the live ones, right-aligned at the write column `length`; a
  row longer than `length` moves the write column on (the others get masked holes);
- beams: a request's rows are overwritten by copies of its parents, within its own slots.

Buffers are [row capacity, kv_heads, slot capacity, head_dim] per layer; only when a capacity is
short are they reallocated, and then the leading slots no live row uses are dropped. Slots a
mask zeroes hold finite values (zeros or an old row's), which is all the graph needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ragmix.engine import kv

if TYPE_CHECKING:
    from ragmix.models.generator import Generator

GROW = kv.GROW  # spare slots and rows added when a capacity is reallocated


class RunningBatch:
    def __init__(self, generator: Generator, max_rows: int = 0) -> None:
        """max_rows: the rows admission allows (buffers are made that tall at once: growing them
        row by row during a ramp-up copied the batch at every admission)."""
        like = generator.empty_cache(0)
        self.max_rows = max_rows
        self._past = [np.zeros((0, a.shape[1], 0, a.shape[3]), a.dtype) for a in like]
        self._mask = np.zeros((0, 0), np.int64)
        self._pos = np.zeros(0, np.int64)
        self._last = np.zeros(0, np.int64)
        self.rows = 0  # live rows: [0, rows)
        self.length = 0  # the write column: the next token's KV goes to slot `length`

    @property
    def view(self) -> kv.Batch:
        """The live rows as a kv.Batch of views (no copy): what a decode pass reads."""
        n = self.rows
        return kv.Batch(
            [a[:n] for a in self._past], self._mask[:n], self._pos[:n], self._last[:n], self.length
        )

    @property
    def last(self) -> np.ndarray:
        """The token each live row feeds next (a view: writes go through)."""
        return self._last[: self.rows]

    def append(self, new: list[np.ndarray]) -> None:
        """Write every live row's new token KV (from kv.decode_forward) at the write column."""
        self._reserve(self.rows, append=True)
        n, t = self.rows, self.length
        for buf, fresh in zip(self._past, new, strict=True):
            buf[:n, :, t] = fresh[:, :, 0]  # rows x kv_heads x head_dim
        self._mask[:n, t] = 1
        self._pos[:n] += 1
        self.length = t + 1

    def move(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """Row dst[i] becomes a copy of row src[i] (sources are read before any is written)."""
        dst, src = np.asarray(dst, np.int64), np.asarray(src, np.int64)
        moved = dst != src
        if not moved.any():
            return
        dst, src, t = dst[moved], src[moved], self.length
        for buf in self._past:
            buf[dst, :, :t] = buf[src, :, :t]
        self._mask[dst, :t] = self._mask[src, :t]
        self._pos[dst] = self._pos[src]
        self._last[dst] = self._last[src]

    def free(self, slots: Sequence[int]) -> dict[int, int]:
        """Drop these rows; the last live rows fill their slots. Returns {old slot: new slot} of
        the rows that moved."""
        gone = set(slots)
        live = self.rows - len(gone)
        holes = sorted(s for s in gone if s < live)
        movers = [s for s in range(live, self.rows) if s not in gone]
        self.move(holes, movers)
        self.rows = live
        if live == 0:
            self.length = 0
        return dict(zip(movers, holes, strict=True))

    def add(self, rows: Sequence[kv.Pieces], last: Sequence[int]) -> list[int]:
        """Write new rows (each its KV as pieces) after the live ones; returns their slots."""
        lengths = [kv.pieces_len(r) for r in rows]
        self._reserve(self.rows + len(rows), longest=max(lengths))
        length = self.length = max(self.length, *lengths)
        first = self.rows
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            s = first + i
            self._mask[s] = 0
            kv.write_pieces(self._past, s, length - n, row)
            self._mask[s, length - n : length] = 1
            self._pos[s] = n
            self._last[s] = last[i]
        self.rows = first + len(rows)
        return list(range(first, self.rows))

    def _reserve(self, rows: int, longest: int = 0, append: bool = False) -> None:
        """Room for `rows` rows and for the write column (after a row of `longest` slots joins,
        or after one more append). When short of slots, first drop the leading slots no live row
        uses by shifting the rows left in place; allocate new buffers only when that is not
        enough, or rows are short (fresh memory costs a page fault per 4 KB: a 1.3 GB copy into
        new buffers took 1.6 s here, one within the buffers ~0.2 s)."""
        cap_rows, cap = self._mask.shape
        step = 1 if append else 0
        if rows <= cap_rows and max(self.length + step, longest) <= cap:
            return
        used = np.flatnonzero(self._mask[: self.rows, : self.length].any(axis=0))
        start = int(used[0]) if used.size else self.length
        keep = self.length - start  # slots of the live rows that stay
        if rows <= cap_rows and max(keep + step, longest) <= cap:
            self._shift_left(start)
            return
        new_rows = max(
            cap_rows, self.max_rows, rows + (max(8, rows // 4) if rows > cap_rows else 0)
        )
        new_cap = max(keep + step, longest) + max(GROW, cap // 4)
        past = [np.zeros((new_rows, a.shape[1], new_cap, a.shape[3]), a.dtype) for a in self._past]
        mask = np.zeros((new_rows, new_cap), np.int64)
        n = self.rows
        for buf, old in zip(past, self._past, strict=True):
            buf[:n, :, :keep] = old[:n, :, start : self.length]
        mask[:n, :keep] = self._mask[:n, start : self.length]
        pos, last = np.zeros(new_rows, np.int64), np.zeros(new_rows, np.int64)
        pos[:n], last[:n] = self._pos[:n], self._last[:n]
        self._past, self._mask, self._pos, self._last = past, mask, pos, last
        self.length = keep

    def _shift_left(self, start: int) -> None:
        """Move every live row's slots [start, length) to [0, length - start), in place."""
        keep = self.length - start
        for buf in self._past:
            for r in range(self.rows):  # one row at a time: overlaps need only a small temporary
                buf[r, :, :keep] = buf[r, :, start : self.length]
        self._mask[: self.rows, :keep] = self._mask[: self.rows, start : self.length]
        self._mask[: self.rows, keep:] = 0
        self.length = keep
