"""Out-of-range numbers through a real `ragmix serve` on loopback: INVALID_ARGUMENT naming the field,
never INTERNAL or UNKNOWN, and nothing else disturbed.

The bug this guards: decoding.top_k = 2^32 - 1 passed the old checks, reached the engine step's
np.array([...], np.int32), overflowed, and failed every stream in that step with INTERNAL.
"""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import start_server, stop_server

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

QUESTION = "What does the yield statement do?"
NAN, INF = float("nan"), float("inf")
U32, U64 = 2**32 - 1, 2**64 - 1
MAX_NEW_TOKENS = 64


@pytest.fixture(scope="module")
def server(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path_factory):
    """Its own server: the session one caps max_new_tokens at 48, the stream test needs 64."""
    log = tmp_path_factory.mktemp("validation") / "server.log"
    srv = start_server(
        [
            "--generator", str(tiny_generator_dir),
            "--encoder", str(tiny_encoder_dir),
            "--index", str(tiny_index_dir),
            "--max-top-k", "8",
            "--default-top-k", "2",
            "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--default-max-new-tokens", "4",
            "--threads", "1",
        ],
        log,
    )  # fmt: skip
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        yield pb_grpc.RagServiceStub(ch)


@pytest.fixture(scope="module")
def passage_ids(stub):
    """Two fixed passages: answers compared across runs must not depend on retrieval near-ties."""
    r = stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=2), timeout=60)
    return [p.id for p in r.passages]


def generate(stub, decoding=None, **kw):
    kw.setdefault("query", QUESTION)
    kw.setdefault("top_k", 2)
    decoding = pb.DecodingParams(**({"max_new_tokens": 4} | (decoding or {})))
    return list(stub.Generate(pb.GenerateRequest(decoding=decoding, **kw), timeout=120))


def assert_refused(call, field: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    code, details = e.value.code(), e.value.details()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"{field} must be"), details
    return details


def assert_still_serving(stub) -> None:
    events = generate(stub)
    assert events[-1].WhichOneof("event") == "done"
    assert events[-1].done.usage.generated_tokens == len(events) - 2


GENERATE_REFUSED = [
    ({"decoding": {"top_k": U32}}, "top_k", "in [0, 2147483647] (0 = off), got 4294967295."),
    ({"decoding": {"top_k": 2**31}}, "top_k", "got 2147483648."),
    ({"decoding": {"temperature": NAN}}, "temperature", "got nan."),
    ({"decoding": {"temperature": INF}}, "temperature", "got inf."),
    ({"decoding": {"temperature": 1e-30}}, "temperature", "[0.0001, 10000]"),
    ({"decoding": {"top_p": NAN}}, "top_p", "got nan."),
    ({"decoding": {"top_p": -INF}}, "top_p", "got -inf."),
    ({"decoding": {"top_n": U32}}, "top_n", "in [0, 20], got 4294967295."),
    ({"decoding": {"num_beams": U32}}, "num_beams", "got 4294967295."),
    ({"decoding": {"num_beams": U32}, "mixture": pb.MIXTURE_SEQUENCE}, "num_beams", "[1, 16]"),
    ({"decoding": {"num_return_sequences": U32}}, "num_return_sequences", "got 4294967295."),
    ({"decoding": {"max_new_tokens": U32}}, "max_new_tokens", "in [1, 64], got 4294967295."),
    ({"decoding": {"min_new_tokens": U32}}, "min_new_tokens", "got 4294967295."),
    ({"retrieval_temperature": INF}, "retrieval_temperature", "got inf."),
    ({"retrieval_temperature": NAN}, "retrieval_temperature", "got nan."),
    ({"retrieval_temperature": 1e-30}, "retrieval_temperature", "[0.0001, 10000]"),
    ({"retrieval_temperature": -1.0}, "retrieval_temperature", "got -1.0."),
    ({"top_k": U32}, "top_k", "in [1, 8], got 4294967295."),
    ({"mixture": 99}, "mixture", "got enum value 99."),
]


@pytest.mark.parametrize(("request_kw", "field", "fragment"), GENERATE_REFUSED)
def test_generate_refuses_out_of_range_numbers(stub, request_kw, field, fragment):
    details = assert_refused(lambda: generate(stub, **request_kw), field)
    assert fragment in details
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).version


RETRIEVAL_REFUSED = [
    ({"top_k": U32}, "top_k"),
    ({"retrieval_temperature": INF}, "retrieval_temperature"),
    ({"retrieval_temperature": NAN}, "retrieval_temperature"),
    ({"retrieval_temperature": 1e-30}, "retrieval_temperature"),
]


@pytest.mark.parametrize(("request_kw", "field"), RETRIEVAL_REFUSED)
def test_score_and_retrieve_refuse_out_of_range_retrieval_fields(stub, request_kw, field):
    assert_refused(
        lambda: stub.Score(
            pb.ScoreRequest(query=QUESTION, answer="It makes a generator.", **request_kw),
            timeout=60,
        ),
        field,
    )
    assert_refused(
        lambda: stub.Retrieve(pb.RetrieveRequest(query=QUESTION, **request_kw), timeout=60), field
    )


def test_boundary_values_are_served(stub):
    # The uint64 maximum is a valid seed; top_k at the int32 maximum is valid (it keeps every token).
    for decoding in (
        {"seed": U64, "temperature": 0.8},
        {"top_k": 2**31 - 1, "temperature": 0.8, "seed": 1},
        {"temperature": 1e-4, "top_p": 1e-6, "seed": 2},
        {"max_new_tokens": 1, "top_n": 20},
    ):
        events = generate(stub, decoding)
        assert events[-1].WhichOneof("event") == "done", decoding
        tokens = [e.token for e in events[1:-1]]
        assert 1 <= len(tokens) <= decoding.get("max_new_tokens", 4)
        assert all(t.logprob <= 0 for t in tokens)
    seeded = [generate(stub, {"seed": U64, "temperature": 0.8})[-1].done.text for _ in range(2)]
    assert seeded[0] == seeded[1]  # the same seed, the same draws
    for tau in (1e-4, 1e4):
        r = stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=4, retrieval_temperature=tau))
        priors = [p.prior for p in r.passages]
        assert all(0 <= p <= 1 for p in priors) and abs(sum(priors) - 1) < 1e-5, priors
    s = stub.Score(
        pb.ScoreRequest(
            query=QUESTION, answer="It makes a generator.", top_k=2, retrieval_temperature=1e-4
        ),
        timeout=120,
    )
    assert abs(sum(s.token.posterior) - 1) < 1e-5


def test_normal_requests_still_work_and_nothing_was_internal(stub, server):
    assert_still_serving(stub)
    log = server.output()
    assert "internal error" not in log and "ERROR ragmix" not in log, log[-3000:]


def test_a_refused_request_beside_a_long_stream_leaves_the_stream_alone(stub, passage_ids, server):
    request = pb.GenerateRequest(
        query=QUESTION,
        passage_ids=passage_ids,
        decoding=pb.DecodingParams(max_new_tokens=MAX_NEW_TOKENS),
    )
    list(stub.Generate(request, timeout=300))  # warms the passages' prefix cache
    alone = list(stub.Generate(request, timeout=300))

    sent = time.monotonic()
    stream = stub.Generate(request, timeout=300)
    events, refused_at = [], []
    for ev in stream:
        events.append(ev)
        if ev.WhichOneof("event") == "token" and len(refused_at) < 8:
            # The refused request: valid but for decoding.top_k >= 2^31 (the int32 overflow).
            for top_k in (2**31, U32):
                assert_refused(
                    lambda top_k=top_k: generate(
                        stub, {"top_k": top_k, "temperature": 0.7}, passage_ids=passage_ids
                    ),
                    "top_k",
                )
            refused_at.append(time.monotonic() - sent)
    assert stream.code() == grpc.StatusCode.OK

    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "passages" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    done = events[-1].done
    tokens = [e.token for e in events[1:-1]]
    assert done.usage.generated_tokens == len(tokens)
    assert len(tokens) == MAX_NEW_TOKENS or done.finish_reason == pb.FINISH_REASON_EOS
    assert done.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    # The refusals really were beside the stream: the first came back before the server finished
    # it (the server's arrival-to-done time can only end later than sent + total_ms).
    assert refused_at and refused_at[0] * 1e3 < done.timings.total_ms, (refused_at, done.timings)
    # And the stream is the one it is alone.
    assert [t.id for t in tokens] == [e.token.id for e in alone[1:-1]]
    assert done.text == alone[-1].done.text
    assert "internal error" not in server.output()


@pytest.mark.parametrize(
    ("method", "streaming", "raw"),
    [
        ("Generate", True, b"\x0a\x02\xff\xfe"),  # field 1 (query): two bytes of invalid UTF-8
        ("Retrieve", False, b"\x0a\x02\xff\xfe"),
        ("Retrieve", False, b"\xff\xff\xff"),  # not a protobuf message at all
    ],
)
def test_requests_that_do_not_parse_are_invalid_argument(server, method, streaming, raw):
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(server.target) as ch:
        path = f"/ragmix.v1.RagService/{method}"
        with pytest.raises(grpc.RpcError) as e:
            if streaming:
                list(ch.unary_stream(path, **identity)(raw, timeout=30))
            else:
                ch.unary_unary(path, **identity)(raw, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
