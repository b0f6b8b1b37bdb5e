"""A FAISS GPU copy of a flat index for the searches, where FAISS reports GPUs.

The CPU index stays the one of record (online changes go to both, snapshots are written from the
CPU one); the GPU copy only answers searches. Only the flat type is moved: HNSW has no GPU version
in FAISS (its GPU graph index, CAGRA, needs a cuVS build), and IVF-PQ's per-call nprobe is not a
search parameter FAISS's GPU indexes take, so both keep searching on the CPU.

Deleted rows: rather than an IDSelector (which FAISS's GPU flat search does not take), the GPU
search asks for k + (deleted rows) results and drops the deleted ones, which is exact for a flat
index (the k best live rows are among the k + d best of all); past FAISS's GPU limit on k the
search goes to the CPU index.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

GPU_MAX_K = 2048  # FAISS's GPU k-selection limit (faiss/gpu/utils/DeviceDefs.cuh)


def gpus() -> int:
    """GPUs this FAISS build can use (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class GpuFlat:
    """The GPU copy of a flat (inner product) index on device `device`."""

    def __init__(self, index: Any, device: int) -> None:
        self.device = device
        self._resources = faiss.StandardGpuResources()
        self._index = faiss.index_cpu_to_gpu(self._resources, device, index)

    @classmethod
    def of(cls, index: Any, kind: str, device: int | None) -> GpuFlat | None:
        """A GPU copy when asked for (`device` not None), the index is flat and FAISS has GPUs."""
        if device is None:
            return None
        if kind != "flat":
            LOG.info("FAISS searches the %s index on the CPU (GPU copies are for flat)", kind)
            return None
        if gpus() <= device:
            LOG.info(
                "FAISS searches on the CPU: this FAISS build sees %d GPUs (faiss-cpu, or no "
                "device %d); install a FAISS GPU build for GPU search",
                gpus(),
                device,
            )
            return None
        copy = cls(index, device)
        LOG.info("FAISS searches a GPU copy of the flat index on GPU %d", device)
        return copy

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(vectors)

    def can_search(self, k: int, deleted: int) -> bool:
        return k + deleted <= GPU_MAX_K

    def search(
        self, queries: np.ndarray, k: int, masked: Any, deleted: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the live rows: k + deleted from the GPU, the deleted dropped (masked(rows)
        says which rows are deleted), -1 / -inf padding where fewer than k rows remain."""
        fetch = min(k + deleted, self.ntotal)
        scores, rows = self._index.search(queries, fetch)  # queries x fetch
        rows = rows.astype(np.int64, copy=False)
        if not deleted:
            return scores[:, :k], rows[:, :k]
        out_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
        out_rows = np.full((queries.shape[0], k), -1, np.int64)
        live = (rows >= 0) & ~masked(rows)  # queries x fetch
        for q in range(queries.shape[0]):
            keep = np.flatnonzero(live[q])[:k]
            out_scores[q, : keep.size] = scores[q, keep]
            out_rows[q, : keep.size] = rows[q, keep]
        return out_scores, out_rows
