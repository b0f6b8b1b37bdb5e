"""Every out-of-range request parameter is refused with a message naming field, range and value.

Each numeric field is tried at 0, 1, its maximum, maximum + 1, the proto maxima 2^32 - 1 and
2^64 - 1, a negative value, NaN and +-inf; whatever `verify` accepts must go through the engine's
array constructors and the kernel's input checks without overflow (that path used to turn
top_k = 2^32 - 1 into an OverflowError and INTERNAL for every stream in the step).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ragmix.engine import params as P
from ragmix.engine.params import DecodingParams, Limits, Mixture, RetrievalParams
from ragmix.engine.retrieval import prior
from ragmix.errors import ValidationError
from ragmix.kernels.reference import check_step_inputs
from ragmix.service import convert
from ragmix_client.proto import ragmix_pb2 as pb

LIMITS = Limits(max_top_k=10, default_top_k=3, max_new_tokens=64, default_max_new_tokens=16)
NAN, INF = float("nan"), float("inf")
U32, U64 = 2**32 - 1, 2**64 - 1
REFUSED = object()


def f32(x: float) -> float:
    """x as a proto float field carries it."""
    return float(np.float32(x))


def below_f32(x: float) -> float:
    """The float32 just below float32(x)."""
    return float(np.nextafter(np.float32(x), np.float32(0)))


def test_defaults_are_filled_from_limits():
    r = RetrievalParams("What is yield?").verify(LIMITS)
    d = DecodingParams().verify(LIMITS)
    assert (r.top_k, r.retrieval_temperature) == (3, 1.0)
    assert (d.max_new_tokens, d.top_p, d.greedy) == (16, 1.0, True)
    assert (d.num_beams, d.num_return_sequences, d.top_k, d.top_n, d.seed) == (4, 1, 0, 0, None)


# (field, value, what verify stores, or REFUSED). Maxima: LIMITS, int32 for top_k, uint64 for seed.
DECODING_CASES = [
    ("max_new_tokens", 0, 16),
    ("max_new_tokens", 1, 1),
    ("max_new_tokens", 64, 64),
    ("max_new_tokens", 65, REFUSED),
    ("max_new_tokens", U32, REFUSED),
    ("max_new_tokens", U64, REFUSED),
    ("max_new_tokens", -1, REFUSED),
    ("max_new_tokens", NAN, REFUSED),
    ("max_new_tokens", INF, REFUSED),
    ("max_new_tokens", 8.0, REFUSED),  # a float would be truncated silently
    ("min_new_tokens", 0, 0),
    ("min_new_tokens", 1, 1),
    ("min_new_tokens", 64, 64),  # max_new_tokens is 64 in these cases
    ("min_new_tokens", 65, REFUSED),
    ("min_new_tokens", U32, REFUSED),
    ("min_new_tokens", U64, REFUSED),
    ("min_new_tokens", -1, REFUSED),
    ("min_new_tokens", NAN, REFUSED),
    ("min_new_tokens", -INF, REFUSED),
    ("temperature", 0.0, 0.0),
    ("temperature", 1.0, 1.0),
    ("temperature", P.MIN_TEMPERATURE, P.MIN_TEMPERATURE),
    ("temperature", P.MAX_TEMPERATURE, P.MAX_TEMPERATURE),
    ("temperature", P.MAX_TEMPERATURE + 1, REFUSED),
    ("temperature", f32(P.MIN_TEMPERATURE), f32(P.MIN_TEMPERATURE)),  # 1e-4 sent as a float
    ("temperature", below_f32(P.MIN_TEMPERATURE), REFUSED),
    ("temperature", P.MIN_TEMPERATURE / 2, REFUSED),
    ("temperature", 1e-40, REFUSED),  # float32 1/T would overflow
    ("temperature", float(U32), REFUSED),
    ("temperature", float(U64), REFUSED),
    ("temperature", -0.5, REFUSED),
    ("temperature", NAN, REFUSED),
    ("temperature", INF, REFUSED),
    ("temperature", -INF, REFUSED),
    ("top_p", 0.0, 1.0),  # 0 = off
    ("top_p", 1.0, 1.0),
    ("top_p", 0.5, 0.5),
    ("top_p", P.MIN_TOP_P, P.MIN_TOP_P),
    ("top_p", f32(P.MIN_TOP_P), f32(P.MIN_TOP_P)),
    ("top_p", below_f32(P.MIN_TOP_P), REFUSED),
    ("top_p", 1.0 + 2**-30, REFUSED),
    ("top_p", 2.0, REFUSED),
    ("top_p", 1.5, REFUSED),
    ("top_p", 1e-50, REFUSED),  # float32(1e-50) == 0, which the kernel refuses
    ("top_p", float(U32), REFUSED),
    ("top_p", -0.1, REFUSED),
    ("top_p", NAN, REFUSED),
    ("top_p", INF, REFUSED),
    ("top_p", -INF, REFUSED),
    ("top_k", 0, 0),
    ("top_k", 1, 1),
    ("top_k", P.INT32_MAX, P.INT32_MAX),
    ("top_k", P.INT32_MAX + 1, REFUSED),
    ("top_k", U32, REFUSED),
    ("top_k", U64, REFUSED),
    ("top_k", -1, REFUSED),
    ("top_k", NAN, REFUSED),
    ("top_k", INF, REFUSED),
    ("seed", 0, 0),
    ("seed", 1, 1),
    ("seed", U32, U32),
    ("seed", U64, U64),
    ("seed", U64 + 1, REFUSED),
    ("seed", -3, REFUSED),
    ("seed", NAN, REFUSED),
    ("seed", INF, REFUSED),
    ("num_beams", 0, 4),
    ("num_beams", 1, 1),
    ("num_beams", 16, 16),
    ("num_beams", 17, REFUSED),
    ("num_beams", U32, REFUSED),
    ("num_beams", U64, REFUSED),
    ("num_beams", -1, REFUSED),
    ("num_beams", NAN, REFUSED),
    ("num_beams", INF, REFUSED),
    ("top_n", 0, 0),
    ("top_n", 1, 1),
    ("top_n", 20, 20),
    ("top_n", 21, REFUSED),
    ("top_n", U32, REFUSED),
    ("top_n", U64, REFUSED),
    ("top_n", -1, REFUSED),
    ("top_n", NAN, REFUSED),
    ("top_n", -INF, REFUSED),
    ("num_return_sequences", 0, 1),
    ("num_return_sequences", 1, 1),
    ("num_return_sequences", 16, 16),
    ("num_return_sequences", 17, REFUSED),
    ("num_return_sequences", U32, REFUSED),
    ("num_return_sequences", U64, REFUSED),
    ("num_return_sequences", -1, REFUSED),
    ("num_return_sequences", NAN, REFUSED),
    ("num_return_sequences", INF, REFUSED),
]

RETRIEVAL_CASES = [
    ("top_k", 0, 3),
    ("top_k", 1, 1),
    ("top_k", 10, 10),
    ("top_k", 11, REFUSED),
    ("top_k", U32, REFUSED),
    ("top_k", U64, REFUSED),
    ("top_k", -1, REFUSED),
    ("top_k", NAN, REFUSED),
    ("top_k", INF, REFUSED),
    ("retrieval_temperature", 0.0, 1.0),  # 0 = 1.0
    ("retrieval_temperature", 1.0, 1.0),
    ("retrieval_temperature", 0.01, 0.01),
    ("retrieval_temperature", P.MIN_RETRIEVAL_TEMPERATURE, P.MIN_RETRIEVAL_TEMPERATURE),
    ("retrieval_temperature", P.MAX_RETRIEVAL_TEMPERATURE, P.MAX_RETRIEVAL_TEMPERATURE),
    ("retrieval_temperature", f32(1e-4), f32(1e-4)),
    ("retrieval_temperature", below_f32(1e-4), REFUSED),
    ("retrieval_temperature", P.MAX_RETRIEVAL_TEMPERATURE + 1, REFUSED),
    ("retrieval_temperature", 1e-30, REFUSED),
    ("retrieval_temperature", 5e-324, REFUSED),
    ("retrieval_temperature", float(U32), REFUSED),
    ("retrieval_temperature", float(U64), REFUSED),
    ("retrieval_temperature", -1.0, REFUSED),
    ("retrieval_temperature", NAN, REFUSED),
    ("retrieval_temperature", INF, REFUSED),
    ("retrieval_temperature", -INF, REFUSED),
    ("query", "q", "q"),
    ("query", "x" * 2000, "x" * 2000),
    ("query", "x" * 2001, REFUSED),
    ("query", "", REFUSED),
    ("query", "   ", REFUSED),
]


def _make_decoding(field: str, value) -> DecodingParams:
    kw = {field: value}
    if field == "min_new_tokens":
        kw["max_new_tokens"] = 64
    return DecodingParams(**kw)


def _assert_refusal(err: ValidationError, field: str, value) -> None:
    message = str(err)
    assert err.param == field
    assert message.startswith(f"{field} must be "), message
    if isinstance(value, (int, float)) and field != "query":
        assert f"got {value!r}." in message, message  # the value as received
        assert " in [" in message or " in (0, 1]" in message, message  # the allowed range


@pytest.mark.parametrize(("field", "value", "stored"), DECODING_CASES)
def test_decoding_field_range(field, value, stored):
    d = _make_decoding(field, value)
    if stored is REFUSED:
        with pytest.raises(ValidationError) as e:
            d.verify(LIMITS)
        _assert_refusal(e.value, field, value)
    else:
        assert getattr(d.verify(LIMITS), field) == stored


@pytest.mark.parametrize(("field", "value", "stored"), RETRIEVAL_CASES)
def test_retrieval_field_range(field, value, stored):
    kw = {"query": "What is yield?", field: value}
    r = RetrievalParams(**kw)
    if stored is REFUSED:
        with pytest.raises(ValidationError) as e:
            r.verify(LIMITS)
        _assert_refusal(e.value, field, value)
    else:
        assert getattr(r.verify(LIMITS), field) == stored


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: DecodingParams(top_k=U32),
            "top_k must be in [0, 2147483647] (0 = off), got 4294967295.",
        ),
        (
            lambda: DecodingParams(temperature=NAN),
            "temperature must be in [0.0001, 10000] (or 0 = greedy), got nan.",
        ),
        (lambda: DecodingParams(top_n=U32), "top_n must be in [0, 20], got 4294967295."),
        (lambda: DecodingParams(max_new_tokens=65), "max_new_tokens must be in [1, 64], got 65."),
        (lambda: DecodingParams(top_p=1.5), "top_p must be in (0, 1] and >= 1e-06 (0 = off), got 1.5."),
        (lambda: DecodingParams(seed=2**64), f"seed must be in [0, {U64}], got {2**64}."),
        (lambda: RetrievalParams("q", top_k=11), "top_k must be in [1, 10], got 11."),
        (
            lambda: RetrievalParams("q", retrieval_temperature=1e-30),
            "retrieval_temperature must be in [0.0001, 10000] (0 = 1.0), got 1e-30.",
        ),
    ],
)  # fmt: skip
def test_messages_name_field_range_and_value(make, message):
    with pytest.raises(ValidationError) as e:
        make().verify(LIMITS)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"query": "q", "passage_ids": ["a", "a"]}, "passage_ids", "repeat"),
        ({"query": "q", "passage_ids": [str(i) for i in range(11)]}, "passage_ids", "at most 10"),
        ({"query": "q", "passage_ids": ["a", ""]}, "passage_ids", "non-empty"),
        ({"query": "q", "passage_ids": ["a"], "top_k": U32}, "top_k", "ignored with passage_ids"),
        ({"query": 7}, "query", "a string"),
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
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stop": ["s"] * 17}, "stop", "at most 16"),
        ({"stop": [3]}, "stop", "non-empty strings"),
        ({"top_k": True}, "top_k", "an integer"),
        ({"temperature": "hot"}, "temperature", "a number"),
        ({"max_new_tokens": 8, "min_new_tokens": 9}, "min_new_tokens", "max_new_tokens = 8"),
    ],
)
def test_decoding_params_refused(kwargs, field, fragment):
    with pytest.raises(ValidationError) as e:
        DecodingParams(**kwargs).verify(LIMITS)
    assert e.value.param == field
    assert fragment in str(e.value)


def test_numpy_scalars_are_accepted_and_normalised():
    d = DecodingParams(
        top_k=np.uint32(5), seed=np.uint64(U64), temperature=np.float32(0.5), top_n=np.int64(2)
    ).verify(LIMITS)
    assert (d.top_k, d.seed, d.top_n) == (5, U64, 2)
    assert type(d.top_k) is int and type(d.seed) is int and type(d.temperature) is float


def test_single_stop_string_becomes_a_list():
    assert DecodingParams(stop="END").stop == ["END"]


def test_passage_ids_set_top_k():
    r = RetrievalParams("q", top_k=1, passage_ids=["a", "b"]).verify(LIMITS)
    assert r.top_k == 2


# ------------------------------------------------------- accepted values reach the kernel safely

ANY_NUMBER = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-2, 70),
    st.sampled_from([0, 1, P.INT32_MAX, P.INT32_MAX + 1, U32, U64, U64 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 2, allow_subnormal=True),
)


DECODING_NUMBERS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "seed",
                    "num_beams", "top_n", "num_return_sequences"]  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True)
@given(values=st.fixed_dictionaries({}, optional=dict.fromkeys(DECODING_NUMBERS, ANY_NUMBER)))
def test_accepted_decoding_goes_through_the_engines_arrays_and_the_kernel_checks(values):
    d = DecodingParams(**values)
    try:
        d.verify(LIMITS)
    except ValidationError as e:
        assert e.param in values
        event("refused")
        return
    event("accepted")
    # What the engine builds for one step of this request (engine.py), then the kernel's checks.
    temperature32 = np.array([d.temperature], np.float32)
    top_k32 = np.array([d.top_k], np.int32)
    top_p32 = np.array([d.top_p], np.float32)
    assert top_k32[0] == d.top_k
    assert d.greedy or (temperature32[0] > 0 and np.isfinite(np.float32(1) / temperature32[0]))
    np.random.default_rng(d.seed)
    check_step_inputs(
        np.zeros((1, 4), np.float32),
        np.zeros(1, np.float32),
        np.array([0, 1]),
        temperature32,
        top_k32,
        top_p32,
        np.array([0.5]),
        d.top_n,
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tau=ANY_NUMBER, seed=st.integers(0, 2**32 - 1))
def test_accepted_retrieval_temperature_gives_a_finite_prior(tau, seed):
    try:
        r = RetrievalParams("q", retrieval_temperature=tau).verify(LIMITS)
    except ValidationError as e:
        assert e.param == "retrieval_temperature"
        event("refused")
        return
    event("accepted")
    rng = np.random.default_rng(seed)
    for scores in (
        rng.uniform(-1, 1, 10).astype(np.float32),  # inner products of unit vectors
        np.array([1.0, -1.0, 1.0, 0.999999], np.float32),  # the widest spread, and ties
    ):
        p = prior(scores, r.retrieval_temperature)
        assert np.all(np.isfinite(p)) and math.isclose(p.sum(), 1.0, rel_tol=1e-12)
        assert p.max() > 0


# ----------------------------------------------------------------------------- proto -> params


def test_mixture_enum_values():
    assert convert.mixture_from_pb(pb.MIXTURE_UNSPECIFIED) is Mixture.TOKEN
    for value, mixture in ((1, Mixture.TOKEN), (2, Mixture.SEQUENCE), (3, Mixture.CONCAT)):
        assert convert.mixture_from_pb(value) is mixture


@pytest.mark.parametrize("value", [4, 7, -1, 2**31 - 1, -(2**31)])
def test_unknown_mixture_is_a_validation_error_naming_the_field(value):
    # proto3 enums are open: a newer client's value arrives as a plain int.
    request = pb.GenerateRequest(query="q", mixture=value)
    assert request.mixture == value
    with pytest.raises(ValidationError) as e:
        convert.mixture_from_pb(request.mixture)
    assert e.value.param == "mixture"
    assert str(e.value).startswith("mixture must be one of") and str(value) in str(e.value)


def test_proto_maxima_become_validation_errors_not_overflows():
    decoding = pb.DecodingParams(
        max_new_tokens=U32, min_new_tokens=U32, top_k=U32, num_beams=U32, top_n=U32,
        num_return_sequences=U32, seed=U64, temperature=NAN, top_p=INF,
    )  # fmt: skip
    fields = [
        "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams",
        "num_return_sequences", "top_n",
    ]  # fmt: skip
    for f in fields:  # one out-of-range field at a time, in verify's order
        msg = pb.DecodingParams()
        msg.CopyFrom(decoding)
        for other in fields:
            if other != f:
                msg.ClearField(other)
        with pytest.raises(ValidationError) as e:
            convert.decoding_from_pb(msg).verify(LIMITS)
        assert e.value.param == f
    seeded = convert.decoding_from_pb(pb.DecodingParams(seed=U64)).verify(LIMITS)
    assert seeded.seed == U64  # the uint64 maximum is a valid seed
    assert convert.decoding_from_pb(pb.DecodingParams()).verify(LIMITS).seed is None


@pytest.mark.parametrize(
    "message",
    [
        pb.GenerateRequest(query="q", top_k=U32),
        pb.ScoreRequest(query="q", answer="a", top_k=U32),
        pb.RetrieveRequest(query="q", top_k=U32),
        pb.GenerateRequest(query="q", retrieval_temperature=NAN),
        pb.ScoreRequest(query="q", answer="a", retrieval_temperature=INF),
        pb.RetrieveRequest(query="q", retrieval_temperature=1e-30),
    ],
)
def test_retrieval_fields_of_every_request_are_checked(message):
    with pytest.raises(ValidationError) as e:
        convert.retrieval_from_pb(message).verify(LIMITS)
    assert e.value.param in {"top_k", "retrieval_temperature"}


def test_float32_fields_arrive_as_their_float32_value():
    # 1e-30 is representable in float32 (so it reaches verify, which refuses it); 0.1 is not.
    r = convert.retrieval_from_pb(pb.RetrieveRequest(query="q", retrieval_temperature=0.1))
    assert r.retrieval_temperature == float(np.float32(0.1))
    assert r.verify(LIMITS).retrieval_temperature == pytest.approx(0.1, rel=1e-7)


def test_an_error_message_never_repeats_a_huge_value():
    """Status messages travel in a trailer clients refuse past 16 KiB: a 100k-character value
    echoed back turned INVALID_ARGUMENT into RESOURCE_EXHAUSTED (found by fuzzing)."""
    with pytest.raises(ValidationError) as err:
        DecodingParams(stop=["s" * 100_000]).verify(Limits())
    message = str(err.value)
    assert message.startswith("stop must be") and "(100000 characters)" in message
    assert len(message) < 300
