"""Cancellation, deadlines and SIGTERM drain of a real server, seen through gRPC and its metrics.

Streams are held open by a mechanism, never by timing: the server runs with a step gate
(tests/gated_server.py) that stops the engine once a stream has its first token, until the test
releases it. A held stream cannot finish on any machine, however fast.
"""

from __future__ import annotations

import signal

import grpc
import pytest
from conftest import stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import (
    ACTIVE_ROWS,
    QUESTION,
    free_port,
    requests_key,
    scrape,
    serve_gated,
    tiny_args,
    wait_metrics,
)

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

LONG_TOKENS = 400
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=QUESTION, top_k=4, decoding=pb.DecodingParams(max_new_tokens=LONG_TOKENS)
    )


def serve(dirs, tmp_path, *extra: str):
    """A gated `ragmix serve` that holds every stream after its first token."""
    return serve_gated(tiny_args(*dirs, "--max-new-tokens", str(LONG_TOKENS), *extra), tmp_path)


@pytest.fixture(scope="module")
def dirs(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir):
    return tiny_generator_dir, tiny_encoder_dir, tiny_index_dir


@pytest.fixture(scope="module")
def served(dirs, tmp_path_factory):
    port = free_port()
    server = serve(dirs, tmp_path_factory.mktemp("lifecycle"), "--metrics-port", str(port))
    with grpc.insecure_channel(server.target) as ch:
        yield server, pb_grpc.RagServiceStub(ch), port
    stop_server(server)


def test_client_cancel_frees_rows_at_the_next_step(served):
    _, stub, port = served
    before = scrape(port)
    call = stub.Generate(long_request(), timeout=120)
    assert next(call).WhichOneof("event") == "passages"
    assert next(call).WhichOneof("event") == "token"
    running = wait_metrics(port, lambda m: m[ACTIVE_ROWS] >= 4)
    assert running[ACTIVE_ROWS] == 4  # this request's K rows are in the batch
    call.cancel()
    key = requests_key("Generate", "CANCELLED")
    after = wait_metrics(port, lambda m: m[ACTIVE_ROWS] == 0 and m.get(key, 0) > before.get(key, 0))
    assert after[ACTIVE_ROWS] == 0 and after["ragmix_running_requests"] == 0
    assert after[key] - before.get(key, 0) == 1
    # The engine dropped it as cancelled, held long before its 400 tokens.
    cancelled = 'ragmix_finished_requests_total{reason="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 1
    generated = after["ragmix_generated_tokens_total"] - before["ragmix_generated_tokens_total"]
    assert 1 <= generated < LONG_TOKENS


def test_client_deadline_frees_rows(served):
    _, stub, port = served
    before = scrape(port)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(long_request(), timeout=2))  # held after a token: cannot finish
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    key = requests_key("Generate", "DEADLINE_EXCEEDED")
    after = wait_metrics(port, lambda m: m[ACTIVE_ROWS] == 0 and m.get(key, 0) > before.get(key, 0))
    assert after[ACTIVE_ROWS] == 0 and after["ragmix_queue_depth"] == 0
    assert after[key] - before.get(key, 0) == 1
    # The server keeps serving: a request right after completes once the gate lets it.
    server = served[0]
    server.release()
    try:
        short = pb.GenerateRequest(
            query=QUESTION, top_k=2, decoding=pb.DecodingParams(max_new_tokens=3)
        )
        assert list(stub.Generate(short, timeout=60))[-1].WhichOneof("event") == "done"
    finally:
        server.hold_after(1)


def test_sigterm_drains_in_flight_streams_and_exits_0(dirs, tmp_path):
    server = serve(dirs, tmp_path, "--grace-seconds", "120")
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub, health = pb_grpc.RagServiceStub(ch), health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert next(watch).status == SERVING
            call = stub.Generate(long_request(), timeout=120)
            first = [next(call), next(call)]
            assert [e.WhichOneof("event") for e in first] == ["passages", "token"]

            server.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            check = health.Check(health_pb2.HealthCheckRequest(service="ragmix.v1.RagService"))
            assert check.status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(query=QUESTION), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()

            server.release()
            rest = list(call)  # the in-flight stream runs to its end
            assert rest[-1].WhichOneof("event") == "done"
            tokens = [e for e in first + rest if e.WhichOneof("event") == "token"]
            assert len(tokens) == rest[-1].done.usage.generated_tokens
            watch.cancel()
        assert server.proc.wait(60) == 0
    finally:
        stop_server(server)
    assert "shutting down: draining" in server.output()


def test_sigterm_cancels_streams_still_running_after_the_grace(dirs, tmp_path):
    server = serve(dirs, tmp_path, "--grace-seconds", "0.2")  # held: it outlives any grace
    try:
        with grpc.insecure_channel(server.target) as ch:
            call = pb_grpc.RagServiceStub(ch).Generate(long_request(), timeout=120)
            assert [next(call).WhichOneof("event") for _ in range(2)] == ["passages", "token"]
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert server.proc.wait(60) == 0
    finally:
        stop_server(server)
    assert "grace period over: cancelling 1 RPCs" in server.output()
