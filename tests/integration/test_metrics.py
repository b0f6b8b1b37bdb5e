"""Prometheus metrics and per-RPC log lines of a real server, scraped over HTTP after real requests."""

from __future__ import annotations

import json
import re

import grpc
import pytest
from conftest import start_server, stop_server
from servers import ACTIVE_ROWS, QUESTION, free_port, requests_key, scrape, tiny_args, wait_metrics

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def served(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("metrics") / "server.log"
    server = start_server(
        tiny_args(
            tiny_generator_dir,
            tiny_encoder_dir,
            tiny_index_dir,
            *("--max-new-tokens", "48", "--metrics-port", str(port), "--log-format", "json"),
        ),
        log,
    )
    yield server, port
    stop_server(server)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served[0].target) as ch:
        yield pb_grpc.RagServiceStub(ch)


def test_counters_and_histograms_move_with_requests(served, stub):
    _, port = served
    before = scrape(port)
    tokens = 0
    for _ in range(2):  # the same question twice: the second prefill finds its passages cached
        request = pb.GenerateRequest(
            query=QUESTION, top_k=3, decoding=pb.DecodingParams(max_new_tokens=6)
        )
        events = list(stub.Generate(request, timeout=60))
        tokens += events[-1].done.usage.generated_tokens
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(query=QUESTION, top_k=99), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=2), timeout=30)
    stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    after = wait_metrics(port, lambda m: m[ACTIVE_ROWS] == 0)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(requests_key("Generate", "OK")) == 2
    assert delta(requests_key("Generate", "INVALID_ARGUMENT")) == 1
    assert delta(requests_key("Retrieve", "OK")) == 1
    assert delta(requests_key("GetInfo", "OK")) == 1
    assert delta('ragmix_request_seconds_count{rpc="Generate"}') == 3
    assert tokens >= 2
    assert delta("ragmix_generated_tokens_total") == tokens
    assert delta("ragmix_time_to_first_token_seconds_count") == 2
    assert delta("ragmix_inter_token_latency_seconds_count") == tokens - 2
    assert delta("ragmix_step_seconds_count") >= 6  # at least one step per token of a request
    assert delta("ragmix_batch_rows_sum") >= 3 * 6
    assert delta("ragmix_retrieval_batch_queries_sum") == 3  # the refused one never searched
    assert delta("ragmix_retrieval_seconds_count") >= 1
    assert delta("ragmix_prefill_tokens_total") > 0
    assert delta("ragmix_passage_cache_hits_total") >= 3
    assert (
        delta("ragmix_passage_cache_hits_total") + delta("ragmix_passage_cache_misses_total") == 6
    )
    assert delta("ragmix_cached_prompt_tokens_total") > 0
    assert after["ragmix_passage_cache_bytes"] > 0
    assert (
        delta('ragmix_finished_requests_total{reason="length"}')
        + delta('ragmix_finished_requests_total{reason="eos"}')
        == 2
    )
    assert after["ragmix_queue_depth"] == 0 and after["ragmix_running_requests"] == 0
    assert after["ragmix_in_flight_rpcs"] == 0


def _rpc_lines(log: str) -> list[dict]:
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("msg") == "rpc finished"]


def test_request_id_is_echoed_and_logged(served, stub):
    server, _ = served
    _, call = stub.GetInfo.with_call(
        pb.GetInfoRequest(), metadata=(("x-request-id", "trace-42.a"),), timeout=10
    )
    assert ("x-request-id", "trace-42.a") in tuple(call.trailing_metadata())
    with pytest.raises(grpc.RpcError) as err:  # no id sent: the server makes one
        list(stub.Generate(pb.GenerateRequest(query=""), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    made = dict(err.value.trailing_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    _, call = stub.GetInfo.with_call(  # an id that is not a sane token is replaced
        pb.GetInfoRequest(), metadata=(("x-request-id", "not a token; " + "x" * 200),), timeout=10
    )
    assert re.fullmatch(r"[0-9a-f]{32}", dict(call.trailing_metadata())["x-request-id"])

    lines = _rpc_lines(server.output())
    mine = [x for x in lines if x["request_id"] == "trace-42.a"]
    assert len(mine) == 1
    assert (mine[0]["rpc"], mine[0]["code"], mine[0]["level"]) == ("GetInfo", "OK", "info")
    assert mine[0]["ms"] >= 0 and mine[0]["peer"].startswith("ipv4:127.0.0.1")
    failed = [x for x in lines if x["request_id"] == made]
    assert [(x["rpc"], x["code"]) for x in failed] == [("Generate", "INVALID_ARGUMENT")]
    # With --log-format json every line the server logs is JSON, not only the RPC lines.
    assert any(
        x.startswith("{") and '"logger": "ragmix.service.server"' in x
        for x in server.output().splitlines()
    )
