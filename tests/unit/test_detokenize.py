"""Streamed pieces must join into the answer, and stop strings must cut it exactly."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ragmix.engine.detokenize import IncrementalDetokenizer, StopMatcher

ALPHABET = st.sampled_from(list("ab c\n"))


def first_stop_cut(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """Streaming semantics (as vLLM): stop at the first piece after which any stop string has
    appeared, cutting at the earliest start among the stop strings present by then."""
    for i in range(len(pieces)):
        text = "".join(pieces[: i + 1])
        hits = [j for j in (text.find(s) for s in stops) if j >= 0]
        if hits:
            return text[: min(hits)], True
    return "".join(pieces), False


@settings(max_examples=300, deadline=None)
@example(pieces=[" c", "b"], stops=["c", " cb"])  # "c" completes first, though " cb" starts earlier
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
    expected, expected_stop = first_stop_cut(pieces, stops)
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
