"""Streaming text: token ids in, text pieces out, such that the pieces join into the answer.

Incremental decoding follows TGI: decode a window that starts a few tokens back so that tokenizers
which drop a leading space or need byte context still see it, and hold a piece back while it ends in
an incomplete UTF-8 character. Stop strings are matched across token boundaries: text that could be
the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been returned

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (may be "" while a character is partial)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""


class StopMatcher:
    """Finds the first stop string in streamed text; releases only text that cannot start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string matched)."""
        buf = self._held + piece
        if not self._stops:
            self._held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Text held back at the end of generation (no stop string followed it)."""
        out, self._held = self._held, ""
        return out

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
