"""Serving benchmarks (issue 4), each a ratio measured inside one run:

a) time to first token, cold vs warm passage prefix cache: the same questions twice, sequentially,
   against a `ragmix serve` subprocess over the default models;
b) aggregate generated tokens/s at 1, 4 and 16 concurrent streams (the load generator, in-process,
   against the same server, warm cache), and the step time against the batch's arithmetic at a
   measured numpy float32 GEMM rate; per level also the ideal tokens/s from the server's own step
   times (/metrics scraped before and after: generated tokens / sum of step seconds, i.e. the
   engine never idle between steps), achieved / ideal, ITL p50 / p99 and the ramp-up fraction of
   the window, checked against the issue's goals (>= 85 % of ideal at 4 and 16 streams, ITL p99
   <= 2 x p50 at 16, ramp-up < 10 %);
c) per-token decode speed of ragmix's engine (K rows) against the same RAG-Token loop written with
   Hugging Face transformers in PyTorch (benchmarks/hf_loop.py), both loaded in this process, same
   passages, same prompt token ids, greedy answers compared.

    python benchmarks/serving.py                       # full run (~12 min on 2 cores)
    python benchmarks/serving.py --questions 8 --max-new-tokens 24 --decode-questions 2

Results: benchmarks/results/serving.json (written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# SmolLM2-135M: weights that take part in a matmul per token (30 layers of attention + MLP
# projections, plus the tied 576 x 49152 output head); see docs/DESIGN.md § Performance model.
LAYERS, HIDDEN, KV_DIM, FFN, VOCAB = 30, 576, 192, 1536, 49152
MATMUL_PARAMS = (
    LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_DIM + 3 * HIDDEN * FFN) + HIDDEN * VOCAB
)


# ------------------------------------------------------------------------------------- shared helpers


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        info["mem_total"] = mem.split(":", 1)[1].strip()
    except OSError:
        pass
    for mod in ("numpy", "onnxruntime", "torch", "transformers", "grpc"):
        with contextlib.suppress(Exception):  # a missing package is just not reported
            info[mod] = __import__(mod).__version__
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path}")


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class Server:
    """`ragmix serve --port 0` in a subprocess; the address comes from its 'serving on' line."""

    def __init__(self, args: list[str], log: Path, timeout: float = 600.0) -> None:
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._f = open(log, "w")  # noqa: SIM115 - the server writes to it for its whole life
        cmd = [sys.executable, "-m", "ragmix.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, *args], stdout=self._f, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"ragmix serving on ([\d.]+):(\d+)", log.read_text())
            if m:
                self.target = f"{m[1]}:{m[2]}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout:g} s; log: {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()


def grpc_ask(stub: Any, pb: Any, question: str, top_k: int, max_new_tokens: int) -> dict[str, Any]:
    """One Generate call over gRPC, timed by the client: TTFT, token times, ids, usage."""
    req = pb.GenerateRequest(
        query=question,
        top_k=top_k,
        mixture=1,
        decoding=pb.DecodingParams(max_new_tokens=max_new_tokens, temperature=0.0),
    )
    t0 = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    out: dict[str, Any] = {"question": question}
    for msg in stub.Generate(req, timeout=300):
        kind = msg.WhichOneof("event")
        if kind == "passages":
            out["passage_ids"] = [p.id for p in msg.passages.passages]
        elif kind == "token":
            times.append(time.perf_counter() - t0)
            ids.append(msg.token.id)
        elif kind == "done":
            out.update(_done_fields(msg.done))
    out["total_s"] = time.perf_counter() - t0
    out.update(_token_stats(times))
    out["tokens"] = ids
    return out


def _done_fields(d: Any) -> dict[str, Any]:
    """Text, usage and server timings of a done event (the proto and the engine's share names)."""
    u, t = d.usage, d.timings
    return {
        "text": d.text,
        "usage": {
            "prompt_tokens": u.prompt_tokens,
            "cached_prompt_tokens": u.cached_prompt_tokens,
            "generated_tokens": u.generated_tokens,
        },
        "server_timings_ms": {
            "retrieval": t.retrieval_ms,
            "queue": t.queue_ms,
            "prefill": t.prefill_ms,
            "first_token": t.first_token_ms,
            "total": t.total_ms,
        },
    }


def _token_stats(times: list[float]) -> dict[str, Any]:
    """TTFT and the decode rate after the first token, from token arrival times (s from send)."""
    n = len(times)
    rate = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None
    return {"ttft_s": times[0] if times else None, "decode_tokens_per_s": rate}


def grpc_stub(target: str) -> tuple[Any, Any, Any]:
    import grpc

    from ragmix_client.proto import ragmix_pb2 as pb
    from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, pb_grpc.RagServiceStub(channel), pb


def load_engine(passage_cache_bytes: int | None = None) -> Any:
    """ragmix's engine in this process over the default bundles, started."""
    from ragmix.config import ServerConfig
    from ragmix.engine.loader import load_engine as _load

    cfg = (
        ServerConfig()
        if passage_cache_bytes is None
        else ServerConfig(passage_cache_bytes=passage_cache_bytes)
    )
    engine = _load(cfg)
    engine.start()
    return engine


async def engine_ask(
    engine: Any, question: str, top_k: int, max_new_tokens: int, top_n: int = 2
) -> dict[str, Any]:
    """One generation through the engine's asyncio API (no gRPC), timed the same way as grpc_ask."""
    from ragmix.engine.outputs import DoneEvent, PassagesEvent, TokenEvent
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    t0 = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    top: list[list[tuple[int, float]]] = []
    out: dict[str, Any] = {"question": question}
    async for ev in engine.generate(
        RetrievalParams(question, top_k=top_k),
        DecodingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_n=top_n),
        Mixture.TOKEN,
    ):
        if isinstance(ev, PassagesEvent):
            out["passages"] = ev.passages
            out["passage_ids"] = [p.id for p in ev.passages]
        elif isinstance(ev, TokenEvent):
            times.append(time.perf_counter() - t0)
            ids.append(ev.id)
            top.append(ev.top)
        elif isinstance(ev, DoneEvent):
            out.update(_done_fields(ev))
    out["total_s"] = time.perf_counter() - t0
    out.update(_token_stats(times))
    out["tokens"] = ids
    out["top"] = top
    return out


def engine_prompts(engine: Any, passages: list[Any], question: str, max_new_tokens: int):
    """The exact prompt token ids and prior the engine builds for these passages (RAG-Token)."""
    return [p.ids for p in engine._prompts(passages, question)], [p.prior for p in passages]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def hf_run(model: Any, engine: Any, ragmix_run: dict[str, Any], max_new_tokens: int):
    """The HF loop on the passages and prompt ids of a ragmix run; compares the greedy answers."""
    import hf_loop

    gen = engine.generator
    prompts, prior = engine_prompts(
        engine, ragmix_run["passages"], ragmix_run["question"], max_new_tokens
    )
    res = hf_loop.rag_token_greedy(
        model, prompts, prior, max_new_tokens, sorted(gen.eos_token_ids), gen.pad_token_id
    )
    cmp: dict[str, Any] = {"same_answer": res.tokens == ragmix_run["tokens"]}
    pos = first_difference(res.tokens, ragmix_run["tokens"])
    if pos is not None:
        cmp["first_difference"] = pos
        if pos < len(res.top2):
            b, vb, r, vr = res.top2[pos]
            cmp["hf_top2_at_difference"] = {"ids": [b, r], "gap": vb - vr}
        if pos < len(ragmix_run.get("top", [])) and len(ragmix_run["top"][pos]) >= 2:
            (b, vb), (r, vr) = ragmix_run["top"][pos][:2]
            cmp["ragmix_top2_at_difference"] = {"ids": [b, r], "gap": vb - vr}
    return res, cmp


# ------------------------------------------------------------------------------------- parts


def matmul_rate(rows: int, seconds: float = 2.0) -> dict[str, Any]:
    """numpy float32 GEMM rate, at BLAS's thread count (= the cores, as onnxruntime's threads=0)."""
    import numpy as np

    def rate(m: int, k: int, n: int) -> float:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)  # m x k
        b = rng.standard_normal((k, n), dtype=np.float32)  # k x n
        a @ b
        reps, t0 = 0, time.perf_counter()
        while (el := time.perf_counter() - t0) < seconds:
            a @ b
            reps += 1
        return 2.0 * m * k * n * reps / el / 1e9

    try:
        from threadpoolctl import threadpool_info

        threads = [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        threads = []
    return {
        "blas_threads": threads,
        "gflops_square_1024": rate(1024, 1024, 1024),
        f"gflops_decode_shape_{rows}x{HIDDEN}x{FFN}": rate(rows, HIDDEN, FFN),
    }


def part_ttft(stub: Any, pb: Any, questions: list[str], top_k: int, max_new: int) -> dict[str, Any]:
    passes = {}
    for name in ("cold", "warm"):
        runs = []
        for q in questions:
            r = grpc_ask(stub, pb, q, top_k, max_new)
            runs.append(r)
            print(
                f"  {name:4s} ttft {1e3 * r['ttft_s']:7.0f} ms  cached "
                f"{r['usage']['cached_prompt_tokens']:4d}/{r['usage']['prompt_tokens']:4d}  {q}"
            )
        passes[name] = runs
    cold = [r["ttft_s"] for r in passes["cold"]]
    warm = [r["ttft_s"] for r in passes["warm"]]
    out = {
        "median_ttft_ms": {"cold": 1e3 * median(cold), "warm": 1e3 * median(warm)},
        "ratio_cold_over_warm": median(cold) / median(warm),
        "goal_ratio": 8.0,
        "cached_prompt_tokens": {
            p: sum(r["usage"]["cached_prompt_tokens"] for r in passes[p]) for p in passes
        },
        "prompt_tokens": {p: sum(r["usage"]["prompt_tokens"] for r in passes[p]) for p in passes},
        "same_answers_cold_vs_warm": sum(
            a["tokens"] == b["tokens"] for a, b in zip(passes["cold"], passes["warm"], strict=True)
        ),
        "runs": {
            p: [{k: v for k, v in r.items() if k != "tokens"} for r in runs]
            for p, runs in passes.items()
        },
    }
    print(
        f"TTFT median cold {out['median_ttft_ms']['cold']:.0f} ms, warm "
        f"{out['median_ttft_ms']['warm']:.0f} ms: {out['ratio_cold_over_warm']:.1f}x (goal >= 8x); "
        f"warm pass cached {out['cached_prompt_tokens']['warm']}/{out['prompt_tokens']['warm']} "
        "prompt tokens"
    )
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics samples by name (labelled samples of one name summed)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def step_figures(before: dict[str, float], after: dict[str, float], top_k: int) -> dict[str, Any]:
    """The engine's steps between two scrapes, and the tokens/s it would reach never idle.

    ideal = generated tokens / (sum of step seconds): the requests' tokens (first tokens, made in
    prefill steps, included) over the time the engine spent in steps. The rows/K figure counts
    decode tokens only: /metrics exports rows per step (ragmix_batch_rows), not requests, and a
    RAG-Token request decodes K rows into one token, so requests per step = rows / K.
    """

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps, step_s = d("ragmix_step_seconds_count"), d("ragmix_step_seconds_sum")
    rows, tokens = d("ragmix_batch_rows_sum"), d("ragmix_generated_tokens_total")
    return {
        "steps": int(steps),
        "step_seconds": step_s,
        "step_ms_mean": 1e3 * step_s / steps if steps else None,
        "rows_per_step_mean": rows / steps if steps else None,
        "prefill_seconds": d("ragmix_prefill_seconds_sum"),
        "prefill_passes": int(d("ragmix_prefill_seconds_count")),
        "generated_tokens": int(tokens),
        "ideal_tokens_per_s": tokens / step_s if step_s else None,
        "ideal_decode_tokens_per_s_rows_over_k": rows / top_k / step_s if step_s else None,
    }


def ramp(records: list[Any], c: int, start: float, end: float) -> dict[str, Any]:
    """How much of a level's window is not all c streams streaming at once: from the window's
    start until c requests are between their first token and their end (ramp-up), and from the
    last such moment to the window's end (ramp-down: the last requests finishing)."""
    events = sorted(
        [(r.token_times_s[0], 1) for r in records if r.ok and not r.warmup and r.token_times_s]
        + [(r.end_s, -1) for r in records if r.ok and not r.warmup and r.token_times_s],
        key=lambda e: (e[0], e[1]),  # at a tie an end comes before a start
    )
    n, full_at, full_until = 0, None, None
    for t, step in events:
        if step < 0 and n == c:
            full_until = t
        n += step
        if n >= c and full_at is None:
            full_at = t
    window = max(end - start, 1e-9)
    if full_at is None or full_until is None:
        return {
            "ramp_up_s": window,
            "ramp_down_s": 0.0,
            "ramp_up_fraction": 1.0,
            "ramp_down_fraction": 0.0,
            "note": f"never {c} streams at once",
        }
    return {
        "ramp_up_s": full_at - start,
        "ramp_down_s": end - full_until,
        "ramp_up_fraction": (full_at - start) / window,
        "ramp_down_fraction": (end - full_until) / window,
    }


def part_throughput(
    target: str,
    questions: list[str],
    top_k: int,
    max_new: int,
    levels: list[int],
    requests_per_stream: int,
    min_requests: int,
    prompt_tokens_per_row: float,
    metrics_port: int,
) -> dict[str, Any]:
    from ragmix.bench.loadgen import LoadSpec, run_load

    out: dict[str, Any] = {"levels": {}, "engine": {}, "ramp": {}}
    for c in levels:
        n = max(c * requests_per_stream, min_requests)
        spec = LoadSpec(
            target=target,
            concurrency=(c,),
            requests=n,
            questions=tuple(questions),
            top_k=top_k,
            max_new_tokens=max_new,
            timeout_s=600,
        )
        before = scrape(metrics_port)
        _, results = asyncio.run(run_load(spec, progress=False))
        time.sleep(0.2)  # a step reports its time just after it streamed its tokens
        eng = step_figures(before, scrape(metrics_port), top_k)
        s = results[0].summary()
        start = results[0].measure_start_s
        rmp = ramp(results[0].records, c, start, start + s["duration_s"])
        ideal = eng["ideal_tokens_per_s"]
        eng["achieved_over_ideal"] = s["tokens_per_s"] / ideal if ideal else None
        out["levels"][str(c)], out["engine"][str(c)], out["ramp"][str(c)] = s, eng, rmp
        print(
            f"  c={c:2d}: {s['ok']}/{s['requests']} ok, {s['tokens_per_s']:.1f} tokens/s "
            f"(ideal {ideal or 0:.1f} from {eng['steps']} steps, mean {eng['step_ms_mean'] or 0:.0f}"
            f" ms x {eng['rows_per_step_mean'] or 0:.0f} rows: "
            f"{100 * (eng['achieved_over_ideal'] or 0):.0f}%), itl p50 {s['itl_ms']['p50']:.0f} / "
            f"p99 {s['itl_ms']['p99']:.0f} ms, ttft p50 {s['ttft_ms']['p50']:.0f} ms, ramp-up "
            f"{100 * rmp['ramp_up_fraction']:.0f}% / down {100 * rmp['ramp_down_fraction']:.0f}% "
            f"of {s['duration_s']:.1f} s"
        )
    out["goals"] = throughput_goals(out, levels)
    t1 = out["levels"][str(levels[0])]["tokens_per_s"]
    tn = out["levels"][str(levels[-1])]["tokens_per_s"]
    out[f"ratio_{levels[-1]}_over_{levels[0]}"] = tn / t1
    out["goal_ratio"] = 2.5

    rate = matmul_rate(top_k * levels[-1])
    out["matmul"] = rate
    gflops = rate["gflops_square_1024"]
    out["matmul_params"] = MATMUL_PARAMS
    arith = {}
    for c in levels:
        rows = top_k * c
        past = prompt_tokens_per_row + max_new / 2
        weights_ms = 2.0 * MATMUL_PARAMS * rows / (gflops * 1e9) * 1e3
        attn_ms = 4.0 * LAYERS * HIDDEN * past * rows / (gflops * 1e9) * 1e3
        step_ms = out["levels"][str(c)]["itl_ms"]["p50"]
        arith[str(c)] = {
            "rows": rows,
            "weights_arith_ms": weights_ms,
            "attention_arith_ms": attn_ms,
            "measured_step_ms_itl_p50": step_ms,
            "ratio_measured_over_weights_arith": step_ms / weights_ms,
            "ratio_measured_over_all_arith": step_ms / (weights_ms + attn_ms),
        }
    out["step_vs_arithmetic"] = arith
    out["goal_step_over_arith"] = 1.5
    print(
        f"tokens/s {levels[-1]} vs {levels[0]} streams: {tn / t1:.2f}x (goal >= 2.5x); "
        f"GEMM {gflops:.1f} GFLOP/s (square 1024, BLAS threads {rate['blas_threads']})"
    )
    for c, a in arith.items():
        print(
            f"  c={c:>2s} rows {a['rows']:3d}: step {a['measured_step_ms_itl_p50']:.0f} ms vs "
            f"arithmetic {a['weights_arith_ms']:.0f} ms (+attention {a['attention_arith_ms']:.0f}) "
            f"= {a['ratio_measured_over_weights_arith']:.2f}x / "
            f"{a['ratio_measured_over_all_arith']:.2f}x"
        )
    return out


def throughput_goals(out: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """The issue's checks: achieved >= 85 % of ideal at 4 and 16 streams, ITL p99 <= 2 x p50 at
    16 streams, ramp-up < 10 % of every level's window (levels run other than 4/16 are reported,
    not checked; without a 16 level the largest stands in for it)."""
    checked = [c for c in levels if c in (4, 16)] or levels[-1:]
    top = 16 if 16 in levels else levels[-1]
    g: dict[str, Any] = {
        "goal_achieved_over_ideal": 0.85,
        "goal_itl_p99_over_p50": 2.0,
        "goal_ramp_up_fraction": 0.10,
    }
    for c in checked:
        a = out["engine"][str(c)]["achieved_over_ideal"]
        g[f"achieved_over_ideal_ok_c{c}"] = a is not None and a >= 0.85
    itl = out["levels"][str(top)]["itl_ms"]
    ratio = itl["p99"] / itl["p50"] if itl["p50"] else None
    g[f"itl_p99_over_p50_c{top}"] = ratio
    g[f"itl_p99_over_p50_ok_c{top}"] = ratio is not None and ratio <= 2.0
    g["ramp_up_ok"] = {str(c): out["ramp"][str(c)]["ramp_up_fraction"] < 0.10 for c in levels}
    print(
        "  goals: achieved/ideal >= 85% at "
        + ", ".join(f"c={c} {g[f'achieved_over_ideal_ok_c{c}']}" for c in checked)
        + f"; ITL p99/p50 at c={top} {ratio or 0:.2f} (<= 2: {g[f'itl_p99_over_p50_ok_c{top}']})"
        + "; ramp-up < 10%: "
        + ", ".join(f"c={c} {ok}" for c, ok in g["ramp_up_ok"].items())
    )
    return g


def part_decode(questions: list[str], top_k: int, max_new: int, threads: int) -> dict[str, Any]:
    import hf_loop

    engine = load_engine()
    try:
        model = hf_loop.load_model(threads)
        rows = []
        for q in questions:
            r = asyncio.run(engine_ask(engine, q, top_k, max_new))
            h, cmp = hf_run(model, engine, r, max_new)
            rows.append(
                {
                    "question": q,
                    "ragmix_decode_tokens_per_s": r["decode_tokens_per_s"],
                    "ragmix_tokens": len(r["tokens"]),
                    "hf_decode_tokens_per_s": h.decode_tokens_per_s,
                    "hf_tokens": len(h.tokens),
                    "hf_prefill_s": h.prefill_s,
                    "ragmix_ttft_s": r["ttft_s"],
                    **cmp,
                }
            )
            print(
                f"  ragmix {r['decode_tokens_per_s']:.1f} tok/s ({len(r['tokens'])} tokens), "
                f"HF {h.decode_tokens_per_s:.1f} tok/s ({len(h.tokens)}), same answer "
                f"{cmp['same_answer']}  {q}"
            )
    finally:
        engine.shutdown()
    rm = [x["ragmix_decode_tokens_per_s"] for x in rows if x["ragmix_decode_tokens_per_s"]]
    hm = [x["hf_decode_tokens_per_s"] for x in rows if x["hf_decode_tokens_per_s"]]
    out = {
        "k": top_k,
        "ragmix_decode_tokens_per_s_median": median(rm),
        "hf_decode_tokens_per_s_median": median(hm),
        "ratio": median(rm) / median(hm),
        "goal_ratio": 3.0,
        "ragmix_step_ms": 1e3 / median(rm),
        "hf_step_ms": 1e3 / median(hm),
        "same_answers": sum(x["same_answer"] for x in rows),
        "questions": len(rows),
        "runs": rows,
    }
    print(
        f"decode: ragmix {out['ragmix_decode_tokens_per_s_median']:.1f} tok/s "
        f"({out['ragmix_step_ms']:.0f} ms/step), HF {out['hf_decode_tokens_per_s_median']:.1f} "
        f"tok/s ({out['hf_step_ms']:.0f} ms/step): {out['ratio']:.2f}x (goal >= 3x); same answers "
        f"{out['same_answers']}/{out['questions']}"
    )
    return out


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--questions", type=int, default=20, help="built-in questions for a) and b)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5, help="passages (rows) per question")
    p.add_argument("--concurrency", default="1,4,16", help="stream counts for b)")
    p.add_argument(
        "--requests-per-stream",
        type=int,
        default=8,
        help="b): requests = c * this (8: ramp-up under 10 %% of the window at 16 streams)",
    )
    p.add_argument("--min-requests", type=int, default=6, help="b): at least this many per level")
    p.add_argument("--decode-questions", type=int, default=3, help="questions for c)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in c)")
    p.add_argument("--parts", default="a,b,c", help="which parts to run")
    p.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(HERE))

    from ragmix.bench.loadgen import BUILTIN_QUESTIONS

    questions = list(BUILTIN_QUESTIONS[: args.questions])
    levels = [int(x) for x in args.concurrency.split(",")]
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    t_start = time.perf_counter()
    if parts & {"a", "b"}:
        rows = args.top_k * max(levels)
        server_args = [
            "--max-batch-rows",
            str(max(64, rows)),
            "--max-concurrent-requests",
            str(max(16, max(levels))),
        ]
        metrics_port = free_port()  # b) reads the engine's step times from /metrics
        server_args += ["--metrics-port", str(metrics_port)]
        report["server_args"] = server_args
        with tempfile.TemporaryDirectory() as tmp:
            server = Server(server_args, Path(tmp) / "server.log")
            try:
                channel, stub, pb = grpc_stub(server.target)
                print(
                    f"server on {server.target}; a) TTFT cold vs warm, {len(questions)} questions"
                )
                if "a" in parts:
                    report["ttft"] = part_ttft(stub, pb, questions, args.top_k, args.max_new_tokens)
                    per_row = report["ttft"]["prompt_tokens"]["warm"] / (
                        len(questions) * args.top_k
                    )
                else:
                    per_row = 330.0
                channel.close()
                if "b" in parts:
                    print(f"b) throughput at {levels} streams (warm cache)")
                    report["throughput"] = part_throughput(
                        server.target,
                        questions,
                        args.top_k,
                        args.max_new_tokens,
                        levels,
                        args.requests_per_stream,
                        args.min_requests,
                        per_row,
                        metrics_port,
                    )
            finally:
                server.stop()
        write_json(args.out, report)
    if "c" in parts:
        print(f"c) decode: ragmix engine vs HF loop, K={args.top_k}, {args.decode_questions} q")
        report["decode"] = part_decode(
            list(BUILTIN_QUESTIONS[: args.decode_questions]),
            args.top_k,
            args.max_new_tokens,
            args.threads,
        )
    report["elapsed_s"] = time.perf_counter() - t_start
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
