"""Overload, cancellation storms and a client that stops reading, against one real server.

The server admits 2 requests and queues 2 more (Triton and TGI refuse rather than queue without
bound). Where a test needs requests that cannot finish, the server's step gate holds them
(tests/gated_server.py): nothing here depends on how fast the machine is. Every load is bounded by
a request count, and every call by a deadline, so each test stops by itself.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

import grpc
import pytest
from conftest import stop_server
from servers import QUESTION, free_port, scrape, serve_gated, tiny_args, wait_metrics

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

RUNNING, QUEUED = 2, 2
CLIENTS = 40  # 10x the capacity (running + queued)
CACHE_BYTES = 200_000  # a passage cache far smaller than the tiny index's passages' KV
MIXTURES = (pb.MIXTURE_TOKEN, pb.MIXTURE_SEQUENCE, pb.MIXTURE_CONCAT)
IDLE = ("ragmix_active_rows", "ragmix_running_requests", "ragmix_queue_depth")


@pytest.fixture(scope="module")
def served(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path_factory):
    port = free_port()
    args = tiny_args(
        tiny_generator_dir,
        tiny_encoder_dir,
        tiny_index_dir,
        *("--max-new-tokens", "400", "--metrics-port", str(port)),
        *("--max-concurrent-requests", str(RUNNING), "--max-queued-requests", str(QUEUED)),
        *("--passage-cache-bytes", str(CACHE_BYTES), "--max-batch-rows", "64"),
    )
    server = serve_gated(args, tmp_path_factory.mktemp("load"), hold_after=None)
    yield server, port
    stop_server(server)


@pytest.fixture(scope="module")
def passage_ids(served) -> list[str]:
    with grpc.insecure_channel(served[0].target) as ch:
        r = pb_grpc.RagServiceStub(ch).Retrieve(
            pb.RetrieveRequest(query=QUESTION, top_k=8), timeout=60
        )
    return [p.id for p in r.passages]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def requests(passage_ids: list[str]) -> list[pb.GenerateRequest]:
    """Eight greedy requests over fixed passages (retrieval near-ties cannot change them)."""
    out = []
    for i in range(8):
        mixture = MIXTURES[i % 3]
        decoding = pb.DecodingParams(max_new_tokens=6 + i, num_beams=2)
        ids = passage_ids[i % 4 : i % 4 + 1 + i % 3]
        out.append(
            pb.GenerateRequest(query=QUESTION, mixture=mixture, passage_ids=ids, decoding=decoding)
        )
    return out


def answer(events: list[pb.GenerateResponse]) -> tuple[tuple[int, ...], str]:
    assert events[0].WhichOneof("event") == "passages" and events[-1].WhichOneof("event") == "done"
    return tuple(e.token.id for e in events[1:-1]), events[-1].done.text


def assert_idle(port: int) -> dict[str, float]:
    m = wait_metrics(port, lambda m: all(m[k] == 0 for k in IDLE))
    assert {k: m[k] for k in IDLE} == dict.fromkeys(IDLE, 0), m
    return m


def assert_no_error_logged(server) -> None:
    bad = [
        line
        for line in server.output().splitlines()
        if " ERROR " in line or "Traceback" in line or "internal error" in line
    ]
    assert not bad, "\n".join(bad[:10])


async def consume(call) -> list[pb.GenerateResponse]:
    """Every event of a stream, by read() (grpc.aio forbids mixing it with async iteration)."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def test_overload_refuses_at_once_and_accepted_requests_keep_their_answers(served, passage_ids):
    server, port = served
    reqs = requests(passage_ids)

    async def run() -> dict:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RagServiceStub(ch)
            alone = [answer(await consume(stub.Generate(r, timeout=120))) for r in reqs]
            # Phase 1, held: the 2 running and 2 queued requests cannot finish, so every further
            # request must be refused; a server that queued it would leave it waiting instead.
            server.hold_after(1)
            held = [stub.Generate(reqs[0], timeout=300) for _ in range(RUNNING + QUEUED)]
            for call in held[:RUNNING]:
                await call.read()  # passages: admitted
            wait_metrics(port, lambda m: m["ragmix_queue_depth"] == QUEUED)
            refusals: list[float] = []

            async def refused() -> None:
                t0 = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await consume(stub.Generate(reqs[1], timeout=300))
                refusals.append(time.perf_counter() - t0)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
                assert "at capacity" in err.value.details()

            await asyncio.gather(*(refused() for _ in range(CLIENTS - RUNNING - QUEUED)))
            server.release()
            for i, call in enumerate(held):
                first = [] if i >= RUNNING else [pb.GenerateResponse(passages=pb.Passages())]
                assert answer(first + await consume(call)) == alone[0]

            # Phase 2, free running: 40 clients in a closed loop, 6 requests each.
            before = rss_kb(server.proc.pid)
            codes: dict[str, int] = {}
            mismatches: list[tuple[int, object]] = []
            rng = random.Random(0)

            async def client() -> None:
                for _ in range(6):
                    i = rng.randrange(len(reqs))
                    try:
                        got = answer(await consume(stub.Generate(reqs[i], timeout=300)))
                    except grpc.aio.AioRpcError as e:
                        codes[e.code().name] = codes.get(e.code().name, 0) + 1
                        continue
                    codes["OK"] = codes.get("OK", 0) + 1
                    if got != alone[i]:
                        mismatches.append((i, got))

            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            return dict(refusals=refusals, codes=codes, mismatches=mismatches, before=before)

    out = asyncio.run(run())
    assert not out["mismatches"], out["mismatches"][:3]
    assert set(out["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, out["codes"]
    assert out["codes"]["OK"] >= 1 and sum(out["codes"].values()) == CLIENTS * 6
    m = assert_idle(port)
    assert m["ragmix_passage_cache_bytes"] <= CACHE_BYTES
    after, peak = rss_kb(server.proc.pid), rss_kb(server.proc.pid, "VmHWM")
    assert after <= out["before"] * 1.5 + 100_000, (
        out["before"],
        after,
    )  # kB: no growth per request
    p99 = statistics.quantiles(out["refusals"], n=100)[98] if len(out["refusals"]) > 1 else 0
    print(
        f"overload: {len(out['refusals'])} refused while full, refusal p50 "
        f"{statistics.median(out['refusals']) * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms; storm "
        f"{out['codes']}; RSS before {out['before'] / 1024:.0f} MB, after {after / 1024:.0f} MB, "
        f"peak {peak / 1024:.0f} MB; passage cache {m['ragmix_passage_cache_bytes']:.0f} B"
    )
    assert_no_error_logged(server)


def test_cancellation_storm_leaves_nothing_behind(served, passage_ids):
    server, port = served
    before = scrape(port)
    rng = random.Random(1)
    reqs = requests(passage_ids)
    points = ("before passages", "after passages", "mid-decode")
    seen: dict[str, int] = {}

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RagServiceStub(ch)
            lanes = asyncio.Semaphore(RUNNING + QUEUED)

            async def one(i: int) -> None:
                async with lanes:
                    request = pb.GenerateRequest()
                    request.CopyFrom(reqs[i % len(reqs)])
                    request.decoding.max_new_tokens = 40  # long enough to be cut mid-decode
                    point = rng.choice(points)
                    call = stub.Generate(request, timeout=300)
                    try:
                        if point != "before passages":
                            await call.read()  # passages; a RAG-Sequence request then beams
                        if point == "mid-decode":
                            for _ in range(rng.randrange(1, 4)):
                                await call.read()
                    except grpc.aio.AioRpcError as e:
                        seen[e.code().name] = seen.get(e.code().name, 0) + 1
                    call.cancel()
                    seen[point] = seen.get(point, 0) + 1

            await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(run())
    assert sum(seen[p] for p in points) == 200
    assert set(seen) - set(points) <= {"RESOURCE_EXHAUSTED"}, seen
    m = assert_idle(port)
    cancelled = 'ragmix_finished_requests_total{reason="cancelled"}'
    print(f"cancellation storm: {seen}; engine cancelled {m[cancelled] - before.get(cancelled, 0)}")
    assert m[cancelled] - before.get(cancelled, 0) >= 1
    assert_no_error_logged(server)
    with grpc.insecure_channel(server.target) as ch:
        events = list(pb_grpc.RagServiceStub(ch).Generate(requests(passage_ids)[0], timeout=60))
    assert events[-1].WhichOneof("event") == "done"


def test_a_client_that_stops_reading_stalls_no_one(served, passage_ids):
    """Its stream's HTTP/2 window is 1 KiB and it never reads, so the server cannot send it more
    than that; the engine still finishes its answer and everyone else's, and its deadline ends it."""
    server, port = served
    before = scrape(port)
    finished = 'ragmix_finished_requests_total{reason="length"}'
    slow_request = pb.GenerateRequest(
        query=QUESTION,
        passage_ids=passage_ids[:4],
        decoding=pb.DecodingParams(max_new_tokens=200, min_new_tokens=200, top_n=20),
    )
    tiny_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with (
        grpc.insecure_channel(server.target, options=tiny_window) as slow_ch,
        grpc.insecure_channel(server.target) as ch,
    ):
        slow = pb_grpc.RagServiceStub(slow_ch).Generate(slow_request, timeout=15)
        # The engine finishes the unread request: it never waits on a consumer.
        m = wait_metrics(port, lambda m: m.get(finished, 0) > before.get(finished, 0), timeout=300)
        assert m[finished] == before.get(finished, 0) + 1
        stub = pb_grpc.RagServiceStub(ch)
        for r in requests(passage_ids)[:4]:
            assert answer(list(stub.Generate(r, timeout=120)))
        # Still unread: its answer cannot all reach it, so its deadline ends the call.
        assert slow.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_idle(port)
    assert_no_error_logged(server)
