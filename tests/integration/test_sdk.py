"""The Python SDK against a real `ragmix serve`: installed alone in a fresh virtualenv, sync and
asyncio clients, error mapping, cancellation, deadlines, retries; and the `ragmix ask` experience."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import venv
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ragmix_client import (
    AsyncRagClient,
    Info,
    RagClient,
    RagmixError,
    RetryPolicy,
    Token,
    _health,
)
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What does the yield statement do?"

# Runs inside the fresh virtualenv: only ragmix_client and its two dependencies are installed there.
SDK_SCRIPT = r"""
import asyncio, contextlib, importlib.util, json, sys
import grpc
from ragmix_client import AsyncRagClient, Done, Passages, RagClient, RagmixError, Token

target = sys.argv[1]
Q = "What does the yield statement do?"
out = {"importable": {m: importlib.util.find_spec(m) is not None
                      for m in ("numpy", "onnxruntime", "faiss", "ragmix", "grpc_health")}}

def code_of(fn):
    try:
        fn()
    except RagmixError as e:
        return [e.code.name, e.message]
    return None

with RagClient(target, timeout=60) as c:
    out["health"] = [c.health(), c.health("ragmix.v1.RagService")]
    out["info"] = c.info().max_top_k
    out["retrieve"] = [[p.id, p.prior] for p in c.retrieve(Q, top_k=3)]
    events = list(c.generate(Q, top_k=2, max_new_tokens=6))
    out["kinds"] = [type(e).__name__ for e in events]
    out["token_text"] = "".join(e.text for e in events if isinstance(e, Token))
    out["responsibilities"] = [e.responsibilities for e in events if isinstance(e, Token)]
    a = c.generate_text(Q, top_k=2, max_new_tokens=6)
    out["text"], out["posterior"] = a.text, a.posterior
    out["invalid"] = code_of(lambda: c.generate_text(Q, top_k=99))
    out["not_found"] = code_of(lambda: c.generate_text(Q, passage_ids=["no-such:0"]))
    for ev in c.generate(Q, top_k=8, max_new_tokens=48):
        if isinstance(ev, Token):
            break  # cancels the stream
    out["after_break"] = c.generate_text(Q, top_k=2, max_new_tokens=6).text
    out["deadline"] = code_of(lambda: c.generate_text(Q, top_k=8, max_new_tokens=48, timeout=1e-3))
    s = c.score(Q, "It makes a generator.", top_k=2)
    out["score"] = {
        "answer_tokens": len(s.answer_token_ids),
        "passages": len(s.passages),
        **{name: [m.logprob, m.token_logprobs, m.posterior, m.responsibilities]
           for name, m in (("token", s.token), ("sequence", s.sequence), ("concat", s.concat))},
    }

async def main():
    res = {}
    async with AsyncRagClient(target, timeout=60) as c:
        res["health"] = await c.health()
        res["info"] = (await c.info()).max_top_k
        res["retrieve"] = [[p.id, p.prior] for p in await c.retrieve(Q, top_k=3)]
        kinds = [type(e).__name__ async for e in c.generate(Q, top_k=2, max_new_tokens=6)]
        res["kinds"] = kinds
        a = await c.generate_text(Q, top_k=2, max_new_tokens=6)
        res["text"] = a.text
        try:
            await c.generate_text(Q, top_k=99)
        except RagmixError as e:
            res["invalid"] = [e.code.name, e.message]
        async with contextlib.aclosing(c.generate(Q, top_k=8, max_new_tokens=48)) as stream:
            async for ev in stream:
                if isinstance(ev, Token):
                    break
        res["after_break"] = (await c.generate_text(Q, top_k=2, max_new_tokens=6)).text
        try:
            await c.generate_text(Q, top_k=8, max_new_tokens=48, timeout=1e-3)
        except RagmixError as e:
            res["deadline"] = [e.code.name, e.message]
    return res

out["async"] = asyncio.run(main())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def client(tiny_server):
    with RagClient(tiny_server.target, timeout=120) as c:
        yield c


# ----------------------------------------------------------------------------- health codec


@pytest.mark.parametrize("service", ["", "ragmix.v1.RagService", "é" * 70, "x" * 300])
def test_health_request_encoding_matches_protobuf(service):
    # 140 and 300 bytes need two-byte varint lengths.
    assert (
        _health.encode_request(service)
        == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    )


def test_health_response_decoding_matches_protobuf():
    for name, value in health_pb2.HealthCheckResponse.ServingStatus.items():
        wire = health_pb2.HealthCheckResponse(status=value).SerializeToString()
        assert _health.decode_response(wire) == name
    # A newer server may add fields: a string (2), a fixed64 (3) and a varint (4) are skipped.
    extra = b"\x12\x03abc" + b"\x19" + bytes(8) + b"\x20\x96\x01"
    assert _health.decode_response(extra + b"\x08\x02") == "NOT_SERVING"
    with pytest.raises(ValueError, match="truncated"):
        _health.decode_response(b"\x08\x96")


# ----------------------------------------------------------------------------- fresh venv


def test_sdk_installs_alone_and_works_from_a_fresh_virtualenv(tiny_server, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # Nothing from this interpreter's path may leak in: the venv must stand on its own.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    src = tmp_path / "client"  # a copy: the build leaves no files in the repository
    shutil.copytree(
        ROOT / "client", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    )
    r = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    script = tmp_path / "use_sdk.py"
    script.write_text(SDK_SCRIPT)
    r = subprocess.run(
        [py, str(script), tiny_server.target], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)

    assert out["importable"] == dict.fromkeys(
        ("numpy", "onnxruntime", "faiss", "ragmix", "grpc_health"), False
    )
    assert out["health"] == ["SERVING", "SERVING"]
    assert out["info"] == 8
    assert len(out["retrieve"]) == 3
    assert abs(sum(p for _, p in out["retrieve"]) - 1) < 1e-5
    kinds = out["kinds"]
    assert kinds[0] == "Passages" and kinds[-1] == "Done" and set(kinds[1:-1]) == {"Token"}
    assert all(len(r) == 2 and abs(sum(r) - 1) < 1e-5 for r in out["responsibilities"])
    assert out["text"] == out["token_text"]  # greedy: the same answer twice
    assert len(out["posterior"]) == 2
    assert out["invalid"] == ["INVALID_ARGUMENT", "top_k must be in [1, 8], got 99."]
    assert out["not_found"][0] == "NOT_FOUND" and "no-such:0" in out["not_found"][1]
    assert out["after_break"] == out["text"]
    assert out["deadline"][0] == "DEADLINE_EXCEEDED"
    score = out["score"]
    assert score["passages"] == 2 and score["answer_tokens"] > 0
    assert_real_scores(
        {m: score[m] for m in ("token", "sequence", "concat")}, score["answer_tokens"], k=2
    )

    a = out["async"]
    assert a["health"] == "SERVING" and a["info"] == 8
    assert a["retrieve"] == out["retrieve"]
    assert a["kinds"] == kinds and a["text"] == out["text"] == a["after_break"]
    assert a["invalid"] == out["invalid"]
    assert a["deadline"][0] == "DEADLINE_EXCEEDED"


# ----------------------------------------------------------------------------- in-process


def _cancellations(server) -> int:
    """Requests the engine logged as cancelled (its own line, not the access log's code)."""
    return sum(
        1
        for line in server.output().splitlines()
        if "ragmix.engine" in line and re.search(r"\bcancelled\b", line)
    )


def _wait_for(predicate, seconds: float = 30.0) -> bool:
    """Poll until predicate() holds; a deadline, not a timing assertion."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_breaking_out_of_generate_cancels_the_request_on_the_server(client, tiny_server):
    # Left alone, this request runs all 48 tokens: a cancellation can only come from the break.
    full = client.generate_text(QUESTION, top_k=8, max_new_tokens=48)
    assert full.done.finish_reason == "length" and len(full.tokens) == 48
    before = _cancellations(tiny_server)
    for ev in client.generate(QUESTION, top_k=8, max_new_tokens=48):
        if isinstance(ev, Token):
            break
    assert _wait_for(lambda: _cancellations(tiny_server) == before + 1), tiny_server.output()[
        -2000:
    ]

    async def async_break() -> None:
        async with (
            AsyncRagClient(tiny_server.target) as c,
            contextlib.aclosing(c.generate(QUESTION, top_k=8, max_new_tokens=48)) as stream,
        ):
            async for ev in stream:
                if isinstance(ev, Token):
                    break

    asyncio.run(async_break())
    assert _wait_for(lambda: _cancellations(tiny_server) == before + 2), tiny_server.output()[
        -2000:
    ]
    assert client.generate_text(QUESTION, top_k=8, max_new_tokens=48).text == full.text


def assert_real_scores(mixtures: dict, n_tokens: int, k: int) -> None:
    """Score results that are numbers, not placeholders: name -> (logprob, token_logprobs,
    posterior, responsibilities) for TOKEN, SEQUENCE and CONCAT of an n_tokens answer over k."""
    for name, (logprob, token_logprobs, posterior, responsibilities) in mixtures.items():
        assert math.isfinite(logprob) and logprob < 0, (name, logprob)
        assert len(token_logprobs) == n_tokens, name
        assert all(math.isfinite(lp) and lp <= 0 for lp in token_logprobs), (name, token_logprobs)
        assert abs(sum(token_logprobs) - logprob) < 1e-3 * max(1.0, abs(logprob)), name
        if name == "concat":  # one prompt holds every passage: no latent passage
            assert posterior == [] and responsibilities == []
            continue
        assert len(posterior) == k and all(0 <= p <= 1 for p in posterior), (name, posterior)
        assert abs(sum(posterior) - 1) < 1e-5, (name, posterior)
        if name == "token":  # answer tokens x K, each row a distribution over the passages
            assert len(responsibilities) == n_tokens
            assert all(len(r) == k and abs(sum(r) - 1) < 1e-5 for r in responsibilities)


def test_score_returns_real_scores(client):
    s = client.score(QUESTION, "It turns the function into a generator.", top_k=3)
    assert len(s.passages) == 3 and s.answer_token_ids
    assert_real_scores(
        {
            name: (m.logprob, m.token_logprobs, m.posterior, m.responsibilities)
            for name, m in (("token", s.token), ("sequence", s.sequence), ("concat", s.concat))
        },
        len(s.answer_token_ids),
        k=3,
    )
    # Computed from the answer, not constants: another answer scores differently.
    other = client.score(QUESTION, "A loop over a list.", top_k=3)
    assert other.token.logprob != s.token.logprob


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _InfoOnly(pb_grpc.RagServiceServicer):
    def GetInfo(self, request, context):
        return pb.GetInfoResponse(version="late", max_top_k=3)


def test_unavailable_is_retried_with_backoff_until_the_server_comes_up():
    port = _free_port()
    fast_reconnect = [
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    with RagClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1)) as c:
        with pytest.raises(RagmixError) as e:
            c.info(timeout=10)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE

    result: list[Info | BaseException] = []
    c = RagClient(
        f"127.0.0.1:{port}",
        retry=RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.2),
        options=fast_reconnect,
    )
    caller = threading.Thread(target=lambda: result.append(c.info(timeout=60)))
    caller.start()
    time.sleep(0.5)  # the first attempts find nothing listening
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RagServiceServicer_to_server(_InfoOnly(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        caller.join(60)
        assert result and isinstance(result[0], Info) and result[0].version == "late"
    finally:
        c.close()
        server.stop(None)


def test_bad_arguments_fail_before_any_call(client):
    with pytest.raises(ValueError, match="mixture must be one of token, sequence, concat"):
        client.generate(QUESTION, mixture="tokens")
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        RagClient("127.0.0.1:1", certificate_chain=b"x")


# ----------------------------------------------------------------------------- ragmix ask


def _ask(tiny_server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ragmix.cli",
            "ask",
            QUESTION,
            "--target",
            tiny_server.target,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ask_explain_marks_each_token_with_its_dominant_passage(client, tiny_server):
    r = _ask(tiny_server, "--explain", "--top-k", "3", "--max-new-tokens", "10")
    assert r.returncode == 0, r.stderr
    a = client.generate_text(QUESTION, top_k=3, max_new_tokens=10)
    marked = "".join(
        f"{t.text}[{t.responsibilities.index(max(t.responsibilities)) + 1}]"
        for t in a.tokens
        if t.text
    )
    assert r.stdout.startswith(marked + "\n\n"), r.stdout
    rows = r.stdout.split("\n\n", 1)[1].splitlines()
    assert rows[0].split()[:4] == ["passage", "score", "prior", "posterior"]
    for j, (p, q) in enumerate(zip(a.passages, a.posterior)):
        assert rows[1 + j].split()[:5] == [
            f"[{j + 1}]",
            p.id,
            f"{p.score:.3f}",
            f"{p.prior:.3f}",
            f"{q:.3f}",
        ]
    assert rows[4].startswith(f"[{a.done.finish_reason}, 10 tokens")


def test_ask_json_prints_one_event_per_line(tiny_server):
    r = _ask(tiny_server, "--json", "--top-k", "2", "--max-new-tokens", "5", "--mixture", "concat")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [next(iter(e)) for e in events]
    assert kinds == ["passages", *["token"] * (len(events) - 2), "done"]
    assert len(events[0]["passages"]["passages"]) == 2
    done = events[-1]["done"]
    assert done["text"] == "".join(e["token"]["text"] for e in events[1:-1])
    assert done["usage"]["generated_tokens"] == len(events) - 2


def test_ask_sampling_flags_reach_the_server(client, tiny_server):
    flags = ["--temperature", "1.5", "--top-p", "0.95", "--top-k-tokens", "20", "--seed", "11"]
    r = _ask(tiny_server, "--top-k", "2", "--max-new-tokens", "12", *flags)
    assert r.returncode == 0, r.stderr
    sampled = client.generate_text(
        QUESTION, top_k=2, max_new_tokens=12, temperature=1.5, top_p=0.95, top_k_tokens=20, seed=11
    )
    greedy = client.generate_text(QUESTION, top_k=2, max_new_tokens=12)
    assert sampled.text != greedy.text  # the flags change the answer...
    assert r.stdout.startswith(sampled.text + "\n\n")  # ...exactly as the SDK's request does


def test_ask_exits_non_zero_with_the_servers_message(tiny_server):
    r = _ask(tiny_server, "--explain", "--passage-id", "no-such:0")
    assert r.returncode == 1
    assert "NOT_FOUND" in r.stderr and "no-such:0" in r.stderr
