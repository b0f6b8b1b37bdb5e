"""Split documents into ~100-word passages, the retrieval unit of Lewis et al. (2020).

A passage is a run of whole words (cuts fall only in whitespace) that ends, where it can, at the
end of a sentence or paragraph: a passage that stops mid-sentence embeds half a thought, and the
generator reads it without its end.
"""

from __future__ import annotations

import re

from ragmix.errors import ValidationError

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
_SENTENCE_START = re.compile(r"[\"'“‘(\[]*[A-Z0-9À-Þ]")
SLACK = 0.25
"""How far a passage may stray from `words` to end at a sentence: 100 words means 75 to 125."""


def sentence_ends(text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """Whether a sentence or paragraph ends after each word: a blank line follows it, or it ends
    in . ! ? and the next word starts like a sentence (so "e.g. this" and "3.14" do not)."""
    ends = []
    for i, (a, b) in enumerate(spans):
        if i + 1 == len(spans):
            ends.append(True)
            continue
        nxt = spans[i + 1][0]
        paragraph = text.count("\n", b, nxt) >= 2
        sentence = _SENTENCE_END.search(text, a, b) is not None and (
            _SENTENCE_START.match(text, nxt) is not None
        )
        ends.append(paragraph or sentence)
    return ends


def _cut(ends: list[bool], start: int, words: int) -> int:
    """Where the passage from word `start` ends (exclusive): the sentence end nearest to
    start + words within the slack, else exactly start + words."""
    lo, hi = max(1, round(words * (1 - SLACK))), round(words * (1 + SLACK))
    lengths = [n for n in range(lo, hi + 1) if start + n <= len(ends) and ends[start + n - 1]]
    return start + min(lengths, key=lambda n: abs(n - words), default=words)


def chunk_words(text: str, words: int = 100) -> list[str]:
    """Passages of about `words` words, each a slice of `text` so newlines and layout survive.

    What remains at the end joins the passage before it when it fits in the slack (a tail of a
    few words would retrieve poorly on its own).
    """
    if words < 1:
        raise ValidationError("words_per_passage", f"words_per_passage must be >= 1, got {words}.")
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        return []
    ends = sentence_ends(text, spans)
    bounds, start = [], 0
    while start < len(spans):
        stop = len(spans) if len(spans) - start <= words * (1 + SLACK) else _cut(ends, start, words)
        bounds.append((start, stop))
        start = stop
    return [text[spans[a][0] : spans[b - 1][1]] for a, b in bounds]
