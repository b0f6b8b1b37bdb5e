"""An encoder-decoder (tiny BART) bundle exported by the CLI and served by a real `ragmix serve`
subprocess on loopback: every mixture streams, Score answers, nothing is cached that cannot be,
and an encoder input past the model's source positions is refused with what to do."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

QUESTION = "What does the yield statement do?"


@pytest.fixture(scope="module")
def bart_bundle(tmp_path_factory):
    from tiny_seq2seq import build_tiny_bart

    root = tmp_path_factory.mktemp("bart-server")
    src = build_tiny_bart(root / "hf-bart")
    out = root / "bart"
    args = [sys.executable, "-m", "ragmix.cli", "models", "export", "--from-hf", str(src),
            "--out", str(out)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def short_ids(bart_bundle, tiny_index_dir) -> list[str]:
    """Three passages whose encoder inputs fit (the test picks them: see shortest_passage_ids)."""
    from tiny_seq2seq import shortest_passage_ids

    from ragmix.index import IndexBundle
    from ragmix.models.seq2seq import Seq2SeqGenerator

    index = IndexBundle.load(tiny_index_dir)
    try:
        return shortest_passage_ids(Seq2SeqGenerator.load(bart_bundle, threads=1), index, 3)
    finally:
        index.close()


@pytest.fixture(scope="module")
def stub(bart_bundle, tiny_encoder_dir, tiny_index_dir, tmp_path_factory):
    from conftest import start_server, stop_server
    from servers import tiny_args

    log = tmp_path_factory.mktemp("bart-log") / "server.log"
    server = start_server(tiny_args(bart_bundle, tiny_encoder_dir, tiny_index_dir), log)
    try:
        with grpc.insecure_channel(server.target) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            yield pb_grpc.RagServiceStub(ch)
    finally:
        assert stop_server(server) == 0, server.output()[-3000:]


def generate(stub, **kw) -> list[pb.GenerateResponse]:
    kw.setdefault("query", QUESTION)
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=300))


def test_get_info_says_encoder_decoder_and_no_passage_cache(stub):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert "bart" in info.generator
    assert info.generator_architecture == "encoder-decoder"
    assert not info.passage_cache


def test_rag_token_streams_tokens_with_responsibilities_and_caches_nothing(stub, short_ids):
    for _ in range(2):  # the same passages twice: an encoder has no passage prefix to reuse
        events = generate(stub, passage_ids=short_ids, decoding=pb.DecodingParams(max_new_tokens=6))
        tokens = [e.token for e in events if e.HasField("token")]
        done = events[-1].done
        assert tokens and all(len(t.responsibilities) == 3 for t in tokens)
        assert all(abs(sum(t.responsibilities) - 1) < 1e-4 for t in tokens)
        assert done.usage.cached_prompt_tokens == 0 and done.usage.prompt_tokens > 0
        assert done.usage.generated_tokens == len(tokens)


@pytest.mark.parametrize("fast", [False, True])
def test_rag_sequence_and_concat_answer(stub, short_ids, fast):
    decoding = pb.DecodingParams(max_new_tokens=5, num_beams=2, fast_sequence_decoding=fast)
    events = generate(stub, passage_ids=short_ids, mixture=pb.MIXTURE_SEQUENCE, decoding=decoding)
    done = events[-1].done
    assert done.sequences and len(done.posterior) == 3
    concat = generate(stub, passage_ids=short_ids[:2], mixture=pb.MIXTURE_CONCAT,
                      decoding=pb.DecodingParams(max_new_tokens=4))  # fmt: skip
    assert concat[-1].done.usage.generated_tokens >= 1 and not concat[-1].done.posterior


def test_score_gives_all_three_mixtures(stub):
    r = stub.Score(
        pb.ScoreRequest(query=QUESTION, answer="It returns a value.", top_k=3), timeout=300
    )
    assert len(r.answer_token_ids) >= 2
    for m in (r.token, r.sequence, r.concat):
        assert m.logprob < 0 and abs(sum(m.token_logprobs) - m.logprob) < 1e-3


def test_an_encoder_input_past_the_source_positions_is_refused(stub, short_ids):
    from tiny_seq2seq import LONG_QUESTION

    with pytest.raises(grpc.RpcError) as e:
        generate(stub, query=LONG_QUESTION, passage_ids=short_ids[:1])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source positions" in e.value.details() and "shorter question" in e.value.details()
    # the server is still serving
    done = generate(stub, passage_ids=short_ids[:1], decoding=pb.DecodingParams(max_new_tokens=2))
    assert done[-1].HasField("done")
