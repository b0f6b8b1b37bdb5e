"""SIGTERM under load: the 8 streams in flight all finish within the grace period, new requests
get UNAVAILABLE, health says NOT_SERVING, and the server exits 0.

The server's step gate stops the engine once a stream has its first token, so all 8 (accepted,
queued or decoding) are surely in flight when the signal arrives, on any machine; the test
releases them once it has seen the server refuse new work.
"""

from __future__ import annotations

import signal
import threading

import grpc
from conftest import stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import QUESTION, serve_gated, tiny_args

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

STREAMS = 8
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_with_eight_streams_in_flight_drains_them_all(
    tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path
):
    args = tiny_args(
        tiny_generator_dir, tiny_encoder_dir, tiny_index_dir,
        *("--max-new-tokens", "64", "--grace-seconds", "300", "--max-batch-rows", "64"),
    )  # fmt: skip
    server = serve_gated(args, tmp_path, hold_after=1)
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub, health = pb_grpc.RagServiceStub(ch), health_pb2_grpc.HealthStub(ch)
            mixtures = [pb.MIXTURE_TOKEN, pb.MIXTURE_CONCAT] * (STREAMS // 2)
            calls = [
                stub.Generate(
                    pb.GenerateRequest(
                        query=QUESTION,
                        top_k=1 + i % 4,
                        mixture=m,
                        decoding=pb.DecodingParams(max_new_tokens=20, min_new_tokens=20),
                    ),
                    timeout=300,
                )
                for i, m in enumerate(mixtures)
            ]
            first = [[next(c)] for c in calls]  # passages: accepted, queued or running
            assert all(f[0].WhichOneof("event") == "passages" for f in first)

            server.proc.send_signal(signal.SIGTERM)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == NOT_SERVING
            watch.cancel()
            for _ in range(3):
                try:
                    list(stub.Generate(pb.GenerateRequest(query=QUESTION), timeout=30))
                    raise AssertionError("a new request was accepted during the drain")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    assert "shutting down" in e.details()

            rests: list[list[pb.GenerateResponse] | Exception] = [[] for _ in calls]

            def drain(i: int) -> None:
                try:
                    rests[i] = list(calls[i])
                except grpc.RpcError as e:
                    rests[i] = e

            readers = [threading.Thread(target=drain, args=(i,)) for i in range(STREAMS)]
            for t in readers:
                t.start()
            server.release()
            for t in readers:
                t.join(300)
        for f, rest in zip(first, rests, strict=True):
            assert isinstance(rest, list), rest
            assert rest[-1].WhichOneof("event") == "done"
            tokens = [e for e in f + rest if e.WhichOneof("event") == "token"]
            assert rest[-1].done.usage.generated_tokens == len(tokens) == 20
        assert server.proc.wait(120) == 0
    finally:
        stop_server(server)
    log = server.output()
    assert "shutting down: draining" in log and "grace period over" not in log
    assert "Traceback" not in log and " ERROR " not in log
