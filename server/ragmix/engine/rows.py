"""The running batch's decode rows, in buffers with room to spare, so rows come and go in place.

Requests join, leave and reorder their beams every few steps under load; rebuilding the batch for
each change copies every row. Here a change copies only the rows it concerns (kv.py's slot layout:
row i's KV is slots [0, lengths[i]) of row i of every buffer):

- decode: the generator writes each row's new keys and values at its slot `length`, in place;
- leave: the freed rows are filled with the last live rows (their owners are told where they
  went), and the live count shrinks: rows [0, rows) are always the live ones, so a decode pass
  reads the buffers' first rows as they are (no gather);
- join: new rows are written after the live ones, from slot 0;
- beams: a request's rows are overwritten by copies of its parents, within its own slots.

Buffers are [max_rows, kv_heads, capacity, head_dim] per layer, in the generator's device memory
(models/arrays.py: numpy on the CPU, zeroed lazily by the OS so rows never used cost no memory;
CuPy on a GPU, so decode passes copy nothing to the host); only when a row needs more slots
than the capacity are they reallocated (by half again at least), copying the live rows' slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ragmix.engine import kv
from ragmix.models import arrays

if TYPE_CHECKING:
    from ragmix.models.generator import Generator


class RunningBatch:
    def __init__(self, generator: Generator, max_rows: int = 0) -> None:
        """max_rows: the rows admission allows (buffers are made that tall at once)."""
        self.max_rows = max(max_rows, 1)
        self._past = generator.device_cache(self.max_rows, 0)
        self._lengths = np.zeros(self.max_rows, np.int64)
        self._last = np.zeros(self.max_rows, np.int64)
        self._sources = np.zeros(self.max_rows, np.int64)  # encoder-decoder: source slots
        self.rows = 0  # live rows: [0, rows)

    @property
    def capacity(self) -> int:
        return int(self._past[0].shape[2])

    @property
    def view(self) -> kv.Batch:
        """The live rows as a kv.Batch of views (no copy)."""
        n = self.rows
        return kv.Batch([a[:n] for a in self._past], self._lengths[:n], self._last[:n])

    @property
    def last(self) -> np.ndarray:
        """The token each live row feeds next (a view: writes go through)."""
        return self._last[: self.rows]

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths[: self.rows]

    def decode(self, generator: Generator, rows: np.ndarray | None = None) -> np.ndarray:
        """Logits (rows x V) of one token step of every live row, or only of `rows`.

        All rows: the new keys and values land in place at each row's slot `length`, past what
        the row holds, so nothing the batch holds changes until `append` takes them. `rows`
        (a probe for a failing request): the pass runs on copies, and writes nothing here.
        """
        n = self.rows
        self._reserve(int(self._lengths[:n].max(initial=0)) + 1)
        if rows is None:
            past, lengths, last = [a[:n] for a in self._past], self._lengths[:n], self._last[:n]
            sources = self._sources[:n]
        else:
            picked = arrays.like(self._past[0], rows)
            past, lengths, last = (
                [a[picked] for a in self._past],
                self._lengths[rows],
                self._last[rows],
            )
            sources = self._sources[rows]
        index = np.zeros((lengths.size, 1), np.int64)
        return generator.forward(last[:, None], lengths, index, past, sources)[:, 0, :]

    def append(self) -> None:
        """Take the token every live row's last `decode` wrote: one more slot each."""
        self._lengths[: self.rows] += 1

    def move(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """Row dst[i] becomes a copy of row src[i] (sources are read before any is written)."""
        dst, src = np.asarray(dst, np.int64), np.asarray(src, np.int64)
        moved = dst != src
        if not moved.any():
            return
        dst, src = dst[moved], src[moved]
        t = int(self._lengths[src].max())
        to, of = arrays.like(self._past[0], dst), arrays.like(self._past[0], src)
        for buf in self._past:
            buf[to, :, :t] = buf[of, :, :t]
        self._lengths[dst] = self._lengths[src]
        self._last[dst] = self._last[src]
        self._sources[dst] = self._sources[src]

    def free(self, slots: Sequence[int]) -> dict[int, int]:
        """Drop these rows; the last live rows fill their slots. Returns {old slot: new slot} of
        the rows that moved."""
        gone = set(slots)
        live = self.rows - len(gone)
        holes = sorted(s for s in gone if s < live)
        movers = [s for s in range(live, self.rows) if s not in gone]
        for hole, mover in zip(holes, movers, strict=True):  # one row each: its own slots only
            n = int(self._lengths[mover])
            for buf in self._past:
                buf[hole, :, :n] = buf[mover, :, :n]
            self._lengths[hole], self._last[hole] = n, self._last[mover]
            self._sources[hole] = self._sources[mover]
        self.rows = live
        return dict(zip(movers, holes, strict=True))

    def add(
        self, rows: Sequence[kv.Pieces], last: Sequence[int], sources: Sequence[int] | None = None
    ) -> list[int]:
        """Write new rows (each its KV as pieces, the first sources[i] slots an encoder-decoder
        row's encoder keys and values) after the live ones; returns their slots."""
        lengths = [kv.pieces_len(r) for r in rows]
        first = self.rows
        if first + len(rows) > self.max_rows:
            raise ValueError(f"{first + len(rows)} rows exceed the batch's {self.max_rows}.")
        self._reserve(max(lengths) + 1)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            kv.write_pieces(self._past, first + i, 0, row)
            self._lengths[first + i] = n
            self._last[first + i] = last[i]
            self._sources[first + i] = 0 if sources is None else sources[i]
        self.rows = first + len(rows)
        return list(range(first, self.rows))

    def _reserve(self, slots: int) -> None:
        """Room for `slots` slots in every row: reallocate (copying the live rows' slots) only
        when the capacity is short (fresh memory costs a page fault per 4 KB touched)."""
        cap = self.capacity
        if slots <= cap:
            return
        new_cap = max(slots + kv.GROW, cap + cap // 2)
        n = self.rows
        used = int(self._lengths[:n].max(initial=0))
        xp = arrays.module_of(self._past[0])
        past = [
            xp.zeros((a.shape[0], a.shape[1], new_cap, a.shape[3]), a.dtype) for a in self._past
        ]
        for buf, old in zip(past, self._past, strict=True):
            buf[:n, :, :used] = old[:n, :, :used]
        self._past = past
