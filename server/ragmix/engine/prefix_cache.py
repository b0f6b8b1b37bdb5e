"""The passage prefix cache: KV of a prompt's passage part, reused across requests.

Prompts put the passage before the question and are tokenised as two pieces, so the passage part's
token ids, and therefore its keys and values (causal attention, positions 0..P-1), depend on the
passage alone. A hit replaces the prefill of those P tokens exactly. Keyed by the generator's
fingerprint and the passage part's token ids (which already encode template and passage text).
LRU with a byte budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedPrefix:
    ids: tuple[int, ...]
    past: list[np.ndarray]  # 2*layers x [1, kv_heads, P, head_dim]
    nbytes: int


def prefix_key(fingerprint: str, ids: Sequence[int]) -> bytes:
    h = hashlib.sha256(fingerprint.encode())
    h.update(np.asarray(ids, np.int64).tobytes())
    return h.digest()


class PassageCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedPrefix | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: bytes, ids: Sequence[int], past: list[np.ndarray]) -> bool:
        """Store a copy of `past`; evict least recently used entries to stay within budget."""
        nbytes = sum(a.nbytes for a in past)
        if nbytes > self.max_bytes:
            return False
        entry = CachedPrefix(tuple(ids), [np.ascontiguousarray(a) for a in past], nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self._entries and self.bytes + nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
            self._entries[key] = entry
            self.bytes += nbytes
        return True
