"""End to end with the real default bundles: SmolLM2-135M-Instruct, all-MiniLM-L6-v2, and the
Python Language Reference index, built into the cache on first use (a few minutes on 2 cores)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from conftest import start_server, stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

QUESTION = "What does the yield statement do?"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = start_server([], tmp_path_factory.mktemp("default") / "server.log", timeout=1200)
    yield server
    assert stop_server(server) == 0, server.output()


@pytest.fixture(scope="module")
def stub(default_server):
    with grpc.insecure_channel(default_server.target) as ch:
        yield pb_grpc.RagServiceStub(ch)


def test_info_names_the_default_models(stub):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert "smollm2" in info.generator.lower()
    assert "minilm" in info.encoder.lower()
    assert info.passages > 500


def test_yield_question_retrieves_the_yield_topic_and_streams_an_answer(stub, default_server):
    events = list(
        stub.Generate(
            pb.GenerateRequest(
                query=QUESTION, top_k=3, decoding=pb.DecodingParams(max_new_tokens=40)
            ),
            timeout=600,
        )
    )
    passages = events[0].passages.passages
    assert passages[0].id.startswith("yield:") or passages[0].title == "yield", passages[0]
    tokens = [e.token for e in events[1:-1]]
    done = events[-1].done
    assert tokens and done.text.strip()
    for t in tokens:
        assert abs(sum(t.responsibilities) - 1) <= 1e-5
    assert "".join(t.text for t in tokens) == done.text
    assert "generat" in done.text.lower() or "yield" in done.text.lower(), done.text


def test_health_and_ask_cli(default_server):
    with grpc.insecure_channel(default_server.target) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="ragmix.v1.RagService"), timeout=10
        )
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragmix.cli",
            "ask",
            QUESTION,
            "--target",
            default_server.target,
            "--max-new-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "yield:" in out.stdout


def test_score_invariants_on_the_default_models(stub):
    # Greedy TOKEN answer, then Score of exactly that text with the same passages.
    events = list(
        stub.Generate(
            pb.GenerateRequest(
                query=QUESTION, top_k=3, decoding=pb.DecodingParams(max_new_tokens=24)
            ),
            timeout=600,
        )
    )
    ids = [p.id for p in events[0].passages.passages]
    tokens = [e.token for e in events[1:-1] if e.token.id != 2]  # <|im_end|> is not in the text
    done = events[-1].done
    r = stub.Score(pb.ScoreRequest(query=QUESTION, answer=done.text, passage_ids=ids), timeout=600)
    assert list(r.answer_token_ids) == [t.id for t in tokens]
    for scored, streamed in zip(r.token.token_logprobs, tokens):
        assert abs(scored - streamed.logprob) <= 1e-3
    for scored, streamed in zip(
        [r.token.responsibilities[i * 3 : i * 3 + 3] for i in range(len(tokens))], tokens
    ):
        assert max(abs(a - b) for a, b in zip(scored, streamed.responsibilities)) <= 1e-3
    for m in (r.token, r.sequence):
        assert abs(sum(m.posterior) - 1) <= 1e-5
        assert abs(sum(m.token_logprobs) - m.logprob) <= 1e-3
    # With one passage the two mixtures are the same model.
    one = stub.Score(pb.ScoreRequest(query=QUESTION, answer=done.text, top_k=1), timeout=600)
    assert abs(one.token.logprob - one.sequence.logprob) <= 1e-4


@pytest.mark.parametrize("mixture", [pb.MIXTURE_SEQUENCE, pb.MIXTURE_CONCAT])
def test_other_mixtures_answer_on_the_default_models(stub, mixture):
    events = list(
        stub.Generate(
            pb.GenerateRequest(
                query=QUESTION,
                top_k=3,
                mixture=mixture,
                decoding=pb.DecodingParams(max_new_tokens=24, num_beams=2),
            ),
            timeout=900,
        )
    )
    tokens = [e.token for e in events[1:-1]]
    done = events[-1].done
    assert done.text.strip() and "".join(t.text for t in tokens) == done.text
    if mixture == pb.MIXTURE_SEQUENCE:
        assert abs(sum(done.posterior) - 1) <= 1e-5
        for t in tokens:
            assert abs(sum(t.responsibilities) - 1) <= 1e-5
