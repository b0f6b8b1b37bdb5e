"""A real `ragmix serve` subprocess on loopback, driven through the generated stubs."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ragmix.index.gpu import gpus
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

QUESTION = "What does the yield statement do?"


@pytest.fixture(scope="module")
def channel(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RagServiceStub(channel)


def generate(stub, **kw):
    kw.setdefault("query", QUESTION)
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=120))


def test_get_info_reports_models_index_and_limits(stub):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.generator.startswith("tiny-llama") and "sha256" in info.generator
    assert info.encoder.startswith("tiny-bert")
    assert info.passages > 5
    assert (info.max_top_k, info.max_new_tokens, info.default_top_k) == (8, 48, 4)
    assert info.version
    assert info.device == ("cuda:0" if "CUDAExecutionProvider" in info.providers else "cpu")
    gpu_search = info.device != "cpu" and gpus() > 0 and info.index_type == "flat"
    assert info.index_device == (info.device if gpu_search else "cpu")
    assert info.replica == ""  # one server, not a Ray Serve replica
    assert info.generator_architecture == "decoder-only" and info.passage_cache


def test_retrieve_returns_ranked_passages_with_a_prior(stub):
    r = stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=5), timeout=30)
    assert len(r.passages) == 5
    scores = [p.score for p in r.passages]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(p.prior for p in r.passages) - 1) < 1e-5
    assert all(p.id and p.text for p in r.passages)
    sharp = stub.Retrieve(
        pb.RetrieveRequest(query=QUESTION, top_k=5, retrieval_temperature=0.01), timeout=30
    )
    assert sharp.passages[0].prior > r.passages[0].prior


def test_generate_streams_passages_tokens_done(stub):
    events = generate(stub, top_k=3, decoding=pb.DecodingParams(max_new_tokens=10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "passages" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"}
    assert len(events[0].passages.passages) == 3
    tokens = [e.token for e in events[1:-1]]
    done = events[-1].done
    assert 1 <= len(tokens) <= 10
    for t in tokens:
        assert len(t.responsibilities) == 3
        assert abs(sum(t.responsibilities) - 1) <= 1e-5
        assert t.logprob <= 0
    assert "".join(t.text for t in tokens) == done.text
    assert done.usage.generated_tokens == len(tokens)
    assert done.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert abs(sum(done.posterior) - 1) <= 1e-5
    assert 0 < done.timings.first_token_ms <= done.timings.total_ms


def test_greedy_generate_is_deterministic(stub):
    a = generate(stub, top_k=2, decoding=pb.DecodingParams(max_new_tokens=8))
    b = generate(stub, top_k=2, decoding=pb.DecodingParams(max_new_tokens=8))
    assert a[-1].done.text == b[-1].done.text


@pytest.mark.parametrize(
    ("request_kw", "code", "fragment"),
    [
        ({"query": ""}, grpc.StatusCode.INVALID_ARGUMENT, "query"),
        ({"top_k": 9}, grpc.StatusCode.INVALID_ARGUMENT, "top_k must be in [1, 8], got 9"),
        (
            {"decoding": pb.DecodingParams(max_new_tokens=49)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens must be in [1, 48], got 49",
        ),
        (
            {"decoding": pb.DecodingParams(top_p=1.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p must be in (0, 1]",
        ),
        ({"passage_ids": ["no-such:0"]}, grpc.StatusCode.NOT_FOUND, "no-such:0"),
        ({"mixture": 7}, grpc.StatusCode.INVALID_ARGUMENT, "mixture"),
    ],
)
def test_bad_requests_get_actionable_status_and_server_keeps_serving(
    stub, request_kw, code, fragment
):
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, **request_kw)
    assert e.value.code() == code
    assert fragment in e.value.details()
    # still serving
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).version


def test_retrieve_refuses_bad_top_k(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=100), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_serves_both_names(channel):
    h = health_pb2_grpc.HealthStub(channel)
    for name in ("", "ragmix.v1.RagService"):
        r = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reqs = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="ragmix.v1.RagService"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"ragmix.v1.RagService", "ragmix.v1.IndexAdmin", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0]
    )
    assert fd.name == "ragmix/v1/ragmix.proto"
    assert [s.name for s in fd.service] == ["RagService", "IndexAdmin"]


def test_ask_cli_streams_an_answer(tiny_server):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragmix.cli",
            "ask",
            QUESTION,
            "--target",
            tiny_server.target,
            "--max-new-tokens",
            "6",
            "--top-k",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "posterior" in r.stdout and "tokens" in r.stdout


def test_ask_cli_reports_server_errors(tiny_server):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragmix.cli",
            "ask",
            QUESTION,
            "--target",
            tiny_server.target,
            "--top-k",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "top_k" in r.stderr


def test_score_rpc_returns_all_three_mixtures(stub):
    r = stub.Score(
        pb.ScoreRequest(query=QUESTION, answer="It makes a generator.", top_k=3), timeout=120
    )
    n = len(r.answer_token_ids)
    assert n > 0 and len(r.passages) == 3
    for m in (r.token, r.sequence, r.concat):
        assert len(m.token_logprobs) == n
        assert abs(sum(m.token_logprobs) - m.logprob) < 1e-3
    assert abs(sum(r.token.posterior) - 1) < 1e-5 and abs(sum(r.sequence.posterior) - 1) < 1e-5
    assert len(r.token.responsibilities) == n * 3
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(query=QUESTION, answer=""), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sequence_and_concat_mixtures_stream(stub):
    for mixture in (pb.MIXTURE_SEQUENCE, pb.MIXTURE_CONCAT):
        events = generate(
            stub,
            top_k=2,
            mixture=mixture,
            decoding=pb.DecodingParams(max_new_tokens=6, num_beams=2),
        )
        tokens = [e.token for e in events[1:-1]]
        done = events[-1].done
        assert tokens and "".join(t.text for t in tokens) == done.text
        if mixture == pb.MIXTURE_SEQUENCE:
            assert abs(sum(done.posterior) - 1) < 1e-5
        else:
            assert list(done.posterior) == [] and all(not t.responsibilities for t in tokens)


def test_top_n_alternatives(stub):
    events = generate(stub, top_k=2, decoding=pb.DecodingParams(max_new_tokens=3, top_n=2))
    for e in events[1:-1]:
        alts = e.token.alternatives
        assert len(alts) == 2 and alts[0].id == e.token.id and alts[0].logprob >= alts[1].logprob


def test_sdk_passes_every_decoding_field(tiny_server):
    from ragmix_client import RagClient

    with RagClient(tiny_server.target, timeout=120) as client:
        a = client.generate_text(QUESTION, top_k=2, max_new_tokens=4, top_n=2, min_new_tokens=4)
        assert a.done.usage.generated_tokens == 4
        assert all(len(t.alternatives) == 2 for t in a.tokens)
        s = client.generate_text(
            QUESTION, top_k=2, mixture="sequence", max_new_tokens=4, num_beams=2,
            num_return_sequences=2, fast_sequence_decoding=True,
        )  # fmt: skip
        assert 1 <= len(s.done.sequences) <= 2
        assert s.done.sequences[0].posterior == s.done.posterior
