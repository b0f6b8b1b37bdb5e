"""Every out-of-range request parameter is refused with a message naming field, range and value."""

from __future__ import annotations

import pytest

from ragmix.engine.params import DecodingParams, Limits, RetrievalParams
from ragmix.errors import ValidationError

LIMITS = Limits(max_top_k=10, default_top_k=3, max_new_tokens=64, default_max_new_tokens=16)


def test_defaults_are_filled_from_limits():
    r = RetrievalParams("What is yield?").verify(LIMITS)
    d = DecodingParams().verify(LIMITS)
    assert (r.top_k, r.retrieval_temperature) == (3, 1.0)
    assert (d.max_new_tokens, d.top_p, d.greedy) == (16, 1.0, True)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"query": ""}, "query", "non-empty"),
        ({"query": "   "}, "query", "non-empty"),
        ({"query": "x" * 2001}, "query", "at most 2000 characters"),
        ({"query": "q", "top_k": 11}, "top_k", "in [1, 10], got 11"),
        ({"query": "q", "retrieval_temperature": -1.0}, "retrieval_temperature", "> 0"),
        ({"query": "q", "retrieval_temperature": float("nan")}, "retrieval_temperature", "finite"),
        ({"query": "q", "passage_ids": ["a", "a"]}, "passage_ids", "repeat"),
        ({"query": "q", "passage_ids": [str(i) for i in range(11)]}, "passage_ids", "at most 10"),
    ],
)
def test_retrieval_params_refused(kwargs, field, fragment):
    with pytest.raises(ValidationError) as e:
        RetrievalParams(**kwargs).verify(LIMITS)
    assert e.value.param == field
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"max_new_tokens": 65}, "max_new_tokens", "in [1, 64], got 65"),
        ({"temperature": -0.5}, "temperature", ">= 0"),
        ({"top_p": 1.5}, "top_p", "in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k", ">= 0"),
        ({"seed": -3}, "seed", "[0, 2^64)"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stop": ["s"] * 17}, "stop", "at most 16"),
        ({"num_beams": 17}, "num_beams", "in [1, 16]"),
        ({"top_n": 21}, "top_n", "in [0, 20]"),
    ],
)
def test_decoding_params_refused(kwargs, field, fragment):
    with pytest.raises(ValidationError) as e:
        DecodingParams(**kwargs).verify(LIMITS)
    assert e.value.param == field
    assert fragment in str(e.value)


def test_single_stop_string_becomes_a_list():
    assert DecodingParams(stop="END").stop == ["END"]


def test_passage_ids_set_top_k():
    r = RetrievalParams("q", top_k=1, passage_ids=["a", "b"]).verify(LIMITS)
    assert r.top_k == 2
