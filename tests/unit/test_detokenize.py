"""Streamed pieces must join into the answer, and stop strings must cut it exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ragmix.engine.detokenize import IncrementalDetokenizer, StopMatcher

ALPHABET = st.sampled_from(list("ab c\n"))


def first_stop_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(ALPHABET, max_size=4), max_size=12),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
)
def test_stop_matcher_cuts_at_first_stop_across_piece_boundaries(pieces, stops):
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.push(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    expected, expected_stop = first_stop_cut("".join(pieces), stops)
    assert "".join(out) == expected
    assert stopped == expected_stop


def test_stop_matcher_holds_back_a_possible_stop_prefix():
    m = StopMatcher(["\nQuestion:"])
    assert m.push("Paris.\nQue") == ("Paris.", False)
    assert m.push("en") == ("\nQueen", False)


def test_incremental_detokenizer_joins_multibyte_characters():
    # Byte-level pieces: "é" is two bytes and must not be emitted half-way.
    vocab = {0: b"caf", 1: b"\xc3", 2: b"\xa9", 3: b"!"}

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    d = IncrementalDetokenizer(decode)
    pieces = [d.push(t) for t in [0, 1, 2, 3]]
    assert pieces == ["caf", "", "é", "!"]
    assert "".join(pieces) == decode([0, 1, 2, 3])
