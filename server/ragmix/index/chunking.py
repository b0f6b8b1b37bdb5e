"""Split documents into ~100-word passages, the retrieval unit of Lewis et al. (2020)."""

from __future__ import annotations

import re

from ragmix.errors import ValidationError

_WORD = re.compile(r"\S+")


def chunk_words(text: str, words: int = 100) -> list[str]:
    """Consecutive runs of `words` words, each a slice of `text` so newlines and layout survive.

    A tail shorter than a quarter passage joins the passage before it rather than standing alone
    as a fragment that would retrieve poorly.
    """
    if words < 1:
        raise ValidationError("words_per_passage", f"words_per_passage must be >= 1, got {words}.")
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        return []
    starts = list(range(0, len(spans), words))
    if len(starts) > 1 and len(spans) - starts[-1] < max(1, words // 4):
        starts.pop()
    ends = [*starts[1:], len(spans)]
    return [text[spans[a][0] : spans[b - 1][1]] for a, b in zip(starts, ends, strict=True)]
