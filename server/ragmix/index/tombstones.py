"""Deleted rows, masked at search time with a FAISS ID selector.

FAISS cannot delete from every index type in place (HNSW has no removal; IndexFlat's remove_ids
renumbers the rows after it, which would break row = store row), so a deleted passage keeps its
vector and FAISS is told to skip its row: one bit per row, IDSelectorBitmap wrapped in
IDSelectorNot, passed per call in SearchParameters.sel. Flat, HNSW and IVF searches all honour it.
A rebuild (`ragmix index build`) drops the masked vectors for good.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np


class Tombstones:
    def __init__(self, rows: np.ndarray | None = None) -> None:
        self._bits = np.zeros(0, dtype=np.uint8)  # bit r % 8 of byte r // 8: row r deleted
        self._count = 0
        self._selector: Any = None
        self._parts: tuple[Any, ...] = ()  # SWIG holds raw pointers: keep what they point at
        if rows is not None and len(rows):
            self.mark(rows)

    def __len__(self) -> int:
        return self._count

    def mark(self, rows: np.ndarray) -> None:
        """Mask `rows` from every later search."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[~self.masked(rows)]
        if not rows.size:
            return
        need = int(rows.max()) // 8 + 1
        if need > self._bits.size:
            grown = np.zeros(max(need, 2 * self._bits.size), dtype=np.uint8)
            grown[: self._bits.size] = self._bits
            self._bits = grown
        np.bitwise_or.at(self._bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))
        self._count += int(rows.size)
        self._selector = None  # rebuilt on next use (the bitmap may have moved)

    def masked(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` are deleted."""
        rows = np.asarray(rows, dtype=np.int64)
        inside = (rows >= 0) & ((rows >> 3) < self._bits.size)
        out = np.zeros(rows.shape, dtype=bool)
        r = rows[inside]
        out[inside] = (self._bits[r >> 3] >> (r & 7)) & 1 == 1
        return out

    def selector(self) -> Any:
        """The IDSelector that keeps every row not deleted; None when nothing is deleted, so
        searches of an index without deletions take FAISS's unfiltered (BLAS) path."""
        if not self._count:
            return None
        if self._selector is None:
            bitmap = faiss.IDSelectorBitmap(self._bits.size, faiss.swig_ptr(self._bits))
            self._selector = faiss.IDSelectorNot(bitmap)
            self._parts = (bitmap, self._bits)
        return self._selector
