"""Property-based fuzzing of every RPC against a live `ragmix serve` over the tiny bundles.

Hypothesis draws field values with their boundaries (0, 1, max, max + 1, 2^32 - 1, 2^64 - 1, NaN,
+-inf), unicode of every kind (NUL, RTL marks, 100k characters), repeated and empty lists and
unknown enum values, and, on the wire, what no generated client can send: negative varints in
unsigned fields, lone surrogates and invalid UTF-8 in strings, wrong wire types and unknown fields.

Invariants: the status is OK or a client error, never INTERNAL or UNKNOWN; an INVALID_ARGUMENT
message names the field; no event after `done`; responsibilities, posteriors and priors sum to 1;
and afterwards the server answers a normal request and has logged no internal error. The number
of requests sent is counted and asserted (>= 2,000).
"""

from __future__ import annotations

import math
import struct
from collections import Counter

import grpc
import pytest
from conftest import start_server, stop_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import QUESTION, tiny_args

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

MAX_NEW_TOKENS = 6
MAX_TOP_K = 8
MAX_QUERY_CHARS = 300
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FIELDS = {  # every name an INVALID_ARGUMENT may be about
    *(f.name for m in (pb.GenerateRequest, pb.ScoreRequest, pb.RetrieveRequest, pb.DecodingParams)
      for f in m.DESCRIPTOR.fields),
    "request",
}  # fmt: skip
SENT: Counter[str] = Counter()
CODES: Counter[str] = Counter()
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOLERANCE = 2e-3  # float32 values on the wire


@pytest.fixture(scope="module")
def server(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    srv = start_server(
        tiny_args(
            tiny_generator_dir,
            tiny_encoder_dir,
            tiny_index_dir,
            *("--max-new-tokens", str(MAX_NEW_TOKENS), "--default-max-new-tokens", "3"),
            *("--max-query-chars", str(MAX_QUERY_CHARS), "--max-batch-rows", "64"),
        ),
        log,
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RagServiceStub(channel)


@pytest.fixture(scope="module")
def passage_ids(stub) -> list[str]:
    r = stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=MAX_TOP_K), timeout=60)
    return [p.id for p in r.passages]


# ----------------------------------------------------------------------------- strategies

U32, U64 = 2**32 - 1, 2**64 - 1


def uint32(*near: int) -> st.SearchStrategy[int]:
    """Any uint32, often a boundary: 0, 1, each limit in `near` and its neighbours, 2^31, 2^32-1."""
    edges = {0, 1, 2**31 - 1, 2**31, U32, *(v for n in near for v in (n - 1, n, n + 1) if v >= 0)}
    return st.one_of(st.sampled_from(sorted(edges)), st.integers(0, U32))


def float32() -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 1e-4, 9.9e-5, 1e4, 1.0001e4, 1e-6, 1e-45, 3.4e38]
    specials = [math.nan, math.inf, -math.inf]
    return st.one_of(
        st.sampled_from(edges + specials), st.floats(width=32, allow_nan=True, allow_infinity=True)
    )


BIG_TEXTS = ["a" * 100_000, "é" * 301, "\u202e" * 300, "x" * MAX_QUERY_CHARS]
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_QUERY_CHARS + 5),
    st.sampled_from(["", " ", "\x00", "\u202eyield\u202c", "\ufeff", "\U0001f600" * 3, QUESTION]),
    st.sampled_from(BIG_TEXTS),
)
GOOD_TEXT = st.one_of(
    st.just(QUESTION),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_QUERY_CHARS).filter(str.strip),
    st.sampled_from(["\x00yield\x00", "\u202eyield\u202c", "\U0001f600 for loops?", "é" * 300]),
)


def real(lo: float, hi: float, zero: bool = True) -> st.SearchStrategy[float]:
    """A float32 in [lo, hi] (its ends often), or 0 = the server default."""
    inner = st.one_of(st.sampled_from([lo, hi]), st.floats(lo, hi))
    return st.one_of(st.just(0.0), inner) if zero else inner


# Each field: a valid value or, for the fields a request draws as "junk", anything at all. About
# half the requests are valid throughout, so the engine's paths are fuzzed, not only the checks.
GENERATE_FIELDS = {
    "query": (GOOD_TEXT, TEXT),
    "top_k": (st.integers(0, MAX_TOP_K), uint32(MAX_TOP_K)),
    "mixture": (
        st.integers(0, 3),
        st.one_of(st.sampled_from([4, -1, 2**31 - 1, -(2**31)]), st.integers(0, 9)),
    ),
    "retrieval_temperature": (real(1e-4, 1e4), float32()),
    "max_new_tokens": (st.integers(0, MAX_NEW_TOKENS), uint32(MAX_NEW_TOKENS)),
    "min_new_tokens": (st.integers(0, 2), uint32(MAX_NEW_TOKENS)),
    "temperature": (real(1e-4, 1e4), float32()),
    "top_p": (real(1e-6, 1.0), float32()),
    "decoding.top_k": (st.one_of(st.integers(0, 300), st.just(2**31 - 1)), uint32()),
    "num_beams": (st.integers(0, 4), uint32(16)),
    "top_n": (st.integers(0, 20), uint32(20)),
    "num_return_sequences": (st.integers(0, 4), uint32(16)),
    "stop": (
        st.lists(GOOD_TEXT.map(lambda t: t[:200]), max_size=3),
        st.lists(st.one_of(TEXT, st.just("")), max_size=18),
    ),
    "nprobe": (st.just(0), uint32(16)),  # the tiny index is flat: any nonzero knob is refused
    "ef_search": (st.just(0), uint32(64)),
    "seed": (
        st.one_of(st.none(), st.integers(0, U64)),
        st.one_of(st.none(), st.sampled_from([0, 1, 2**63, U64])),
    ),
}


def junk_fields(names) -> st.SearchStrategy[frozenset[str]]:
    return st.one_of(
        st.just(frozenset()), st.frozensets(st.sampled_from(sorted(names)), max_size=3)
    )


@st.composite
def generate_request(draw: st.DrawFn, known_ids: list[str]) -> pb.GenerateRequest:
    fields = dict(GENERATE_FIELDS, passage_ids=(good_ids(known_ids), ids(known_ids)))
    junk = draw(junk_fields(fields))
    v = {name: draw(pair[name in junk]) for name, pair in fields.items()}
    decoding = pb.DecodingParams(
        max_new_tokens=v["max_new_tokens"],
        min_new_tokens=min(v["min_new_tokens"], v["max_new_tokens"] or 3)
        if "min_new_tokens" not in junk
        else v["min_new_tokens"],
        temperature=v["temperature"],
        top_p=v["top_p"],
        top_k=v["decoding.top_k"],
        num_beams=v["num_beams"],
        top_n=v["top_n"],
        num_return_sequences=v["num_return_sequences"],
        stop=v["stop"],
        fast_sequence_decoding=draw(st.booleans()),
    )
    if v["seed"] is not None:
        decoding.seed = v["seed"]
    return pb.GenerateRequest(
        query=v["query"],
        top_k=v["top_k"],
        mixture=v["mixture"],
        decoding=decoding,
        retrieval_temperature=v["retrieval_temperature"],
        passage_ids=v["passage_ids"],
        nprobe=v["nprobe"],
        ef_search=v["ef_search"],
    )


@st.composite
def score_request(draw: st.DrawFn, known_ids: list[str]) -> pb.ScoreRequest:
    fields = {
        "query": GENERATE_FIELDS["query"],
        "answer": (
            st.one_of(st.just("It returns a generator."), GOOD_TEXT.map(lambda t: t[:20])),
            TEXT,
        ),
        "top_k": GENERATE_FIELDS["top_k"],
        "retrieval_temperature": GENERATE_FIELDS["retrieval_temperature"],
        "passage_ids": (good_ids(known_ids), ids(known_ids)),
        "nprobe": GENERATE_FIELDS["nprobe"],
        "ef_search": GENERATE_FIELDS["ef_search"],
    }
    junk = draw(junk_fields(fields))
    return pb.ScoreRequest(**{name: draw(pair[name in junk]) for name, pair in fields.items()})


def good_ids(known: list[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(
        st.just([]), st.lists(st.sampled_from(known), min_size=1, max_size=MAX_TOP_K, unique=True)
    )


def ids(known: list[str]) -> st.SearchStrategy[list[str]]:
    pool = st.one_of(st.sampled_from(known), st.sampled_from(["", "nope:0", "yield:999"]), TEXT)
    return st.lists(pool, max_size=MAX_TOP_K + 2)


# ----------------------------------------------------------------------------- invariants


def check_status(err: grpc.RpcError) -> None:
    code, details = err.code(), err.details() or ""
    CODES[code.name] += 1
    assert code in CLIENT_ERRORS, (code, details)
    # One client, one request at a time: the server is never full, so RESOURCE_EXHAUSTED here is
    # a status message too large for its trailer (found: 100k-character values echoed back).
    assert code != grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert len(details) < 2000, details[:200]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        named = {f for f in FIELDS if f in details}
        assert named, f"INVALID_ARGUMENT names no field: {details!r}"


def sums_to_one(values, what: str) -> None:
    assert all(0 <= v <= 1 + TOLERANCE for v in values), (what, list(values))
    assert abs(sum(values) - 1) <= TOLERANCE, (what, sum(values))


def check_stream(events: list[pb.GenerateResponse], mixture: int) -> None:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "passages" and kinds[-1] == "done", kinds
    assert set(kinds[1:-1]) <= {"token"}, kinds  # nothing after done, one passages event
    passages = events[0].passages.passages
    k = len(passages)
    assert 1 <= k <= MAX_TOP_K
    sums_to_one([p.prior for p in passages], "prior")
    done = events[-1].done
    tokens = [e.token for e in events[1:-1]]
    assert done.usage.generated_tokens == len(tokens) <= MAX_NEW_TOKENS
    assert (
        done.text == "".join(t.text for t in tokens) or done.finish_reason == pb.FINISH_REASON_STOP
    )
    for t in tokens:
        assert math.isfinite(t.logprob) and t.logprob <= 1e-4
        if mixture == pb.MIXTURE_CONCAT:
            assert not t.responsibilities
        else:
            assert len(t.responsibilities) == k
            sums_to_one(t.responsibilities, "responsibilities")
    if mixture == pb.MIXTURE_CONCAT:
        assert not done.posterior
    else:
        assert len(done.posterior) == k
        sums_to_one(done.posterior, "posterior")
    for seq in done.sequences:
        sums_to_one(seq.posterior, "sequence posterior")


def check_score(r: pb.ScoreResponse) -> None:
    k = len(r.passages)
    sums_to_one([p.prior for p in r.passages], "prior")
    n = len(r.answer_token_ids)
    assert n >= 1
    for name in ("token", "sequence", "concat"):
        m = getattr(r, name)
        assert math.isfinite(m.logprob) and m.logprob <= 1e-3, (name, m.logprob)
        assert len(m.token_logprobs) == n
        assert abs(sum(m.token_logprobs) - m.logprob) <= 1e-2 * max(1, abs(m.logprob))
        if m.posterior:
            assert len(m.posterior) == k
            sums_to_one(m.posterior, f"{name} posterior")
    rows = r.token.responsibilities
    assert len(rows) == n * k
    for i in range(n):
        sums_to_one(rows[i * k : (i + 1) * k], "score responsibilities")


def call(rpc: str, fn, check) -> None:
    SENT[rpc] += 1
    try:
        result = fn()
    except grpc.RpcError as e:
        check_status(e)
        return
    CODES["OK"] += 1
    check(result)


# ----------------------------------------------------------------------------- properties


@settings(SETTINGS, max_examples=700)
@given(data=st.data())
def test_generate(stub, passage_ids, data) -> None:
    request = data.draw(generate_request(passage_ids))
    call(
        "Generate",
        lambda: list(stub.Generate(request, timeout=60)),
        lambda events: check_stream(events, request.mixture or pb.MIXTURE_TOKEN),
    )


@settings(SETTINGS, max_examples=450)
@given(data=st.data())
def test_score(stub, passage_ids, data) -> None:
    request = data.draw(score_request(passage_ids))
    call("Score", lambda: stub.Score(request, timeout=60), check_score)


@settings(SETTINGS, max_examples=450)
@given(
    query=st.one_of(GOOD_TEXT, TEXT),
    top_k=st.one_of(st.integers(0, MAX_TOP_K), uint32(MAX_TOP_K)),
    tau=st.one_of(real(1e-4, 1e4), float32()),
    knobs=st.one_of(st.just((0, 0)), st.tuples(uint32(16), uint32(64))),
)
def test_retrieve(stub, query, top_k, tau, knobs) -> None:
    request = pb.RetrieveRequest(
        query=query, top_k=top_k, retrieval_temperature=tau, nprobe=knobs[0], ef_search=knobs[1]
    )

    def check(r: pb.RetrieveResponse) -> None:
        assert 1 <= len(r.passages) <= MAX_TOP_K
        sums_to_one([p.prior for p in r.passages], "prior")
        assert all(-1.001 <= p.score <= 1.001 for p in r.passages)

    call("Retrieve", lambda: stub.Retrieve(request, timeout=60), check)


# --------------------------------------------------------------------- the wire, by hand


def varint(value: int) -> bytes:
    """Protobuf varint of `value`; negatives as their 64-bit two's complement (10 bytes)."""
    value &= U64
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


VARINT, I64, LEN, I32 = 0, 1, 2, 5
WIRE_VALUE = st.one_of(
    st.tuples(st.just(VARINT), st.integers(-(2**63), U64).map(varint)),
    st.tuples(st.just(I64), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just(I32), st.floats(width=32).map(lambda f: struct.pack("<f", f))),
    st.tuples(
        st.just(LEN),
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\x80", b"ok\x00"]),
            st.text(max_size=30).map(str.encode),
        ).map(lambda b: varint(len(b)) + b),
    ),
)


@st.composite
def wire_message(draw: st.DrawFn) -> bytes:
    """Fields 1-12 (the known ones and beyond) with any wire type and value, plus raw noise."""
    parts = [
        tag(draw(st.integers(1, 12)), wire) + value
        for wire, value in draw(st.lists(WIRE_VALUE, max_size=8))
    ]
    if draw(st.integers(0, 9)) == 0:
        parts.append(draw(st.binary(max_size=16)))  # truncated or garbage bytes
    return b"".join(parts)


@settings(SETTINGS, max_examples=450)
@given(body=wire_message(), rpc=st.sampled_from(["Generate", "Score", "Retrieve", "GetInfo"]))
def test_wire(channel, body, rpc) -> None:
    method = f"/ragmix.v1.RagService/{rpc}"
    parse = {
        "Generate": pb.GenerateResponse,
        "Score": pb.ScoreResponse,
        "Retrieve": pb.RetrieveResponse,
        "GetInfo": pb.GetInfoResponse,
    }[rpc].FromString
    if rpc == "Generate":
        stream = channel.unary_stream(method, lambda b: b, parse)
        call("wire " + rpc, lambda: list(stream(body, timeout=120)), check_wire_stream)
    else:
        unary = channel.unary_unary(method, lambda b: b, parse)
        call("wire " + rpc, lambda: unary(body, timeout=60), lambda r: None)


def check_wire_stream(events: list[pb.GenerateResponse]) -> None:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "passages" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"token"}


def test_get_info(stub) -> None:
    for _ in range(50):
        call("GetInfo", lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=30), lambda r: None)


# ----------------------------------------------------------------------------- afterwards


def test_after_the_fuzz_the_server_serves_and_logged_no_internal_error(server, stub) -> None:
    events = list(
        stub.Generate(
            pb.GenerateRequest(query=QUESTION, decoding=pb.DecodingParams(max_new_tokens=3)),
            timeout=60,
        )
    )
    check_stream(events, pb.MIXTURE_TOKEN)
    assert server.proc.poll() is None
    log = server.output()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    total = sum(SENT.values())
    print(f"fuzzed {total} requests: {dict(SENT)}; statuses {dict(CODES)}")
    assert total >= 2000, dict(SENT)
    assert CODES["OK"] >= 200 and CODES["INVALID_ARGUMENT"] >= 200, dict(CODES)
