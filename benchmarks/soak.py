"""Soak (not CI): a `ragmix serve` subprocess under a steady mixed load for a long while, watched
for memory growth, latency creep and errors.

0. warm-up (not measured): every built-in question once as RAG-Token, so that its passages' KV is
   in the passage prefix cache, then one request of each kind (--warmup-concurrency at once);
1. capacity: a closed loop (as many streams in flight as the server decodes at once, GetInfo's
   max_concurrent_requests) with the soak's request mix for --capacity-seconds; completed
   requests/s after a warm-up quarter (at most 15 s) is the capacity;
2. soak: an open loop, Poisson arrivals at --load x capacity for --duration seconds, latency
   counted from each arrival's scheduled time. The mix (--mix) is RAG-Token, RAG-Sequence and
   Concat Generate streams, Score and Retrieve calls; --cancel-fraction of the Generate streams are
   cancelled by the client after a random number of stream events (1 = just the passages).

Every request has a deadline (--timeout) and the run stops by itself. Recorded: every request's
kind, times and final status (OK; "cancelled" when we cancelled it; else the gRPC code name); the
server's RSS every --sample-seconds (from /proc/<pid>/status) with its /metrics gauges. Reported:
errors by code, the RSS series and its drift over the last half of the soak (at most its last 5
minutes: end vs start, and a linear fit), per-minute latency percentiles (overall and per kind)
and their trend, throughput achieved vs offered, the load average, and pass/fail checks:

- RSS drift < 5 % over the drift window (end vs start, and the fitted slope x window);
- no upward p99 trend: the last full minute's p99 <= 1.25 x the first's, and the fitted slope of
  the per-minute p99 x the soak's duration < 25 % of the median per-minute p99;
- zero INTERNAL / UNKNOWN statuses (and every OK stream ended with a `done` event);
- after the drain the engine's gauges are back to 0 (running requests, active rows, queue depth).

The server is stopped with SIGTERM at the end; its exit code is reported, and its log is scanned
for tracebacks and error lines. Exit status 1 when a check fails.

    python benchmarks/soak.py                        # ~14 min: warm-up, 1 min capacity, 10 min soak
    python benchmarks/soak.py --duration 60 --capacity-seconds 20 --bin-seconds 15 \\
        --out /tmp/soak.json                                     # a quick look
    python benchmarks/soak.py --target 127.0.0.1:50051 --pid 1234 --metrics-port 9090

Results: benchmarks/results/soak.json and soak.png (written to temporary names, then renamed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

KINDS = ("token", "sequence", "concat", "score", "retrieve")
GENERATE_KINDS = ("token", "sequence", "concat")
MIXTURE = {"token": 1, "sequence": 2, "concat": 3}
DEFAULT_MIX = "token=35,sequence=10,concat=20,score=20,retrieve=15"
GAUGES = (
    "ragmix_active_rows",
    "ragmix_running_requests",
    "ragmix_queue_depth",
    "ragmix_passage_cache_bytes",
    "ragmix_passage_cache_entries",
    "ragmix_in_flight_rpcs",
)
# Answers scored by the Score calls (any non-empty text is valid; these fit the built-in questions).
ANSWERS = (
    "It turns the function into a generator.",
    "The generator pauses and returns a value to the caller.",
    "It calls the methods __enter__ and __exit__.",
    "An exception is raised with the raise statement.",
    "A class is defined with the class keyword.",
)
DRIFT_LIMIT = 0.05
TREND_LAST_OVER_FIRST = 1.25
TREND_SLOPE_LIMIT = 0.25


# ------------------------------------------------------------------------------------- records


@dataclass
class Rec:
    """One request. Times are seconds since the run's start (perf_counter)."""

    phase: str
    kind: str
    question: int
    scheduled_s: float
    """Open loop: the arrival time (latency counts from it); closed loop: the send."""
    sent_s: float = 0.0
    end_s: float = 0.0
    status: str = ""
    """OK, 'cancelled' (by this client), a gRPC status code name, or CLIENT_<exception>."""
    cancel_after: int | None = None
    """Generate: cancel after this many stream events (None: not cancelled)."""
    events: int = 0
    ttft_s: float | None = None
    tokens: int = 0
    done: bool = False
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.end_s - self.scheduled_s

    @property
    def finished(self) -> bool:
        """Served to its end as asked: OK, or cancelled by us."""
        return self.status in ("OK", "cancelled")


class Client:
    """One grpc.aio channel to the server and the requests of the mix."""

    def __init__(self, target: str, args: argparse.Namespace) -> None:
        import grpc

        from ragmix_client.proto import ragmix_pb2 as pb
        from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

        self.grpc, self.pb, self.args = grpc, pb, args
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.RagServiceStub(self.channel)
        self.in_flight = 0

    async def connect(self, timeout: float = 30.0) -> dict[str, Any]:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)
        r = await self.stub.GetInfo(self.pb.GetInfoRequest(), timeout=10)
        return {
            "version": r.version,
            "generator": r.generator,
            "encoder": r.encoder,
            "index": r.index,
            "passages": r.passages,
            "providers": list(r.providers),
            "max_top_k": r.max_top_k,
            "max_new_tokens": r.max_new_tokens,
            "max_concurrent_requests": r.max_concurrent_requests,
            "max_queued_requests": r.max_queued_requests,
        }

    def _generate_request(self, kind: str, question: str, seed: int) -> Any:
        a, pb = self.args, self.pb
        d = pb.DecodingParams(max_new_tokens=a.max_new_tokens)
        if kind == "sequence":
            d.num_beams = a.num_beams  # beam search: greedy
        elif a.temperature > 0:
            d.temperature = a.temperature
            d.seed = seed
        return pb.GenerateRequest(query=question, top_k=a.top_k, mixture=MIXTURE[kind], decoding=d)

    async def run(self, rec: Rec, t0: float, questions: list[str], seed: int) -> Rec:
        """Send one request and wait for its end; every failure becomes a status name."""
        a, pb = self.args, self.pb
        q = questions[rec.question]
        self.in_flight += 1
        rec.sent_s = time.perf_counter() - t0
        try:
            if rec.kind in GENERATE_KINDS:
                await self._stream(rec, t0, self._generate_request(rec.kind, q, seed))
            elif rec.kind == "score":
                req = pb.ScoreRequest(query=q, answer=ANSWERS[seed % len(ANSWERS)], top_k=a.top_k)
                await self.stub.Score(req, timeout=a.timeout)
                rec.status = "OK"
            else:
                await self.stub.Retrieve(
                    pb.RetrieveRequest(query=q, top_k=a.top_k), timeout=a.timeout
                )
                rec.status = "OK"
        except self.grpc.aio.AioRpcError as e:
            rec.status, rec.detail = e.code().name, (e.details() or "")[:300]
        except Exception as e:  # a client-side failure is counted, not raised
            rec.status, rec.detail = f"CLIENT_{type(e).__name__}", str(e)[:300]
        finally:
            self.in_flight -= 1
            rec.end_s = time.perf_counter() - t0
        return rec

    async def _stream(self, rec: Rec, t0: float, req: Any) -> None:
        call = self.stub.Generate(req, timeout=self.args.timeout)
        while True:
            msg = await call.read()
            if msg is self.grpc.aio.EOF:
                break
            rec.events += 1
            kind = msg.WhichOneof("event")
            if kind == "token":
                rec.tokens += 1
                if rec.ttft_s is None:
                    rec.ttft_s = time.perf_counter() - t0 - rec.scheduled_s
            elif kind == "done":
                rec.done = True
            if rec.cancel_after is not None and rec.events >= rec.cancel_after and not rec.done:
                call.cancel()
                rec.status = "cancelled"
                return
        rec.status = "OK" if rec.done else "OK_WITHOUT_DONE"
        if rec.cancel_after is not None:
            rec.detail = "cancel planned, stream ended first"

    async def close(self) -> None:
        await self.channel.close()


class Mix:
    """Which kind comes next, its question, seed and cancel point: one seeded generator."""

    def __init__(self, weights: dict[str, float], args: argparse.Namespace, n_questions: int):
        self.kinds = [k for k in KINDS if weights.get(k, 0) > 0]
        self.weights = [weights[k] for k in self.kinds]
        self.rng = random.Random(args.seed + 1)
        self.args, self.n = args, n_questions

    def draw(self, phase: str, scheduled_s: float) -> tuple[Rec, int]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        rec = Rec(phase, kind, self.rng.randrange(self.n), scheduled_s)
        seed = self.rng.randrange(2**31)
        if kind in GENERATE_KINDS and self.rng.random() < self.args.cancel_fraction:
            # Events: 1 passages, then tokens, then done; cancel somewhere before the done.
            rec.cancel_after = self.rng.randint(1, self.args.max_new_tokens + 1)
        return rec, seed


def parse_mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        name = name.strip().lower()
        if name not in KINDS or not w:
            raise SystemExit(
                f"--mix: want NAME=WEIGHT with NAME in {', '.join(KINDS)}, got {part!r}"
            )
        out[name] = float(w)
    if sum(out.values()) <= 0:
        raise SystemExit("--mix: the weights sum to 0")
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


# ------------------------------------------------------------------------------------- server side


def read_rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (10^6 bytes), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 1e6
    except Exception:  # no psutil, or the process is gone
        return None


def scrape_metrics(port: int) -> dict[str, float]:
    """/metrics samples; a labelled sample is keyed name{k=v,...}; histogram buckets dropped."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def safe_scrape(port: int | None) -> dict[str, float] | None:
    if not port:
        return None
    try:
        return await asyncio.to_thread(scrape_metrics, port)
    except Exception as e:  # a failed scrape is a missing sample
        return {"error": str(e)}  # type: ignore[dict-item]


def rpc_counts(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, int]:
    """The server's ragmix_requests_total{code,rpc} between two scrapes."""
    if not before or not after:
        return {}
    out = {}
    for key, v in after.items():
        if key.startswith("ragmix_requests_total{"):
            d = round(v - before.get(key, 0.0))
            if d:
                out[key[len("ragmix_requests_total") :]] = d
    return dict(sorted(out.items()))


def scan_log(path: Path) -> dict[str, Any]:
    """Tracebacks, error / critical lines and INTERNAL / UNKNOWN statuses in the server's log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    bad = re.compile(
        r"Traceback|\bERROR\b|level=error|CRITICAL|\bINTERNAL\b|\bUNKNOWN\b|Fatal|Segm"
    )
    hits = [(i, ln) for i, ln in enumerate(lines) if bad.search(ln)]
    codes = Counter(m[1] for ln in lines if (m := re.search(r"\bcode=(\w+)", ln)))
    return {
        "lines": len(lines),
        "suspect_lines": len(hits),
        "tracebacks": sum("Traceback" in ln for _, ln in hits),
        "codes_in_access_log": dict(sorted(codes.items())),
        "first_suspect_lines": [f"{i + 1}: {ln[:400]}" for i, ln in hits[:20]],
    }


# ------------------------------------------------------------------------------------- phases


class Run:
    """The shared state of one run: the clock, the records, the samples."""

    def __init__(self, client: Client, mix: Mix, questions: list[str], args: argparse.Namespace):
        self.client, self.mix, self.questions, self.args = client, mix, questions, args
        self.t0 = time.perf_counter()
        self.records: list[Rec] = []
        self.samples: list[dict[str, Any]] = []
        self.phase = "start"
        self.phases: dict[str, float] = {"start": 0.0}
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.metrics_port: int | None = None
        self.unsent = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phases[name] = self.now()

    async def one(self, rec: Rec, seed: int) -> None:
        self.records.append(rec)
        await self.client.run(rec, self.t0, self.questions, seed)

    async def sample(self, note: str = "") -> dict[str, Any]:
        s: dict[str, Any] = {
            "t_s": self.now(),
            "phase": self.phase,
            "in_flight": self.client.in_flight,
            "requests": len(self.records),
            "load_1m": os.getloadavg()[0],
        }
        if note:
            s["note"] = note
        if self.pid is not None:
            s["rss_mb"] = read_rss_mb(self.pid)
        m = await safe_scrape(self.metrics_port)
        if m is not None:
            s["gauges"] = {g: m.get(g) for g in GAUGES if g in m} if "error" not in m else m
        self.samples.append(s)
        return s

    async def sampler(self) -> None:
        """A sample every --sample-seconds until cancelled; stops the run if the server dies."""
        every = self.args.sample_seconds
        next_t = self.now()
        while True:
            s = await self.sample()
            if self.proc is not None and self.proc.poll() is not None:
                self.stop_reason = f"server exited with {self.proc.returncode} during the run"
                self.stop.set()
            if len(self.samples) % max(1, round(30 / every)) == 1 or every >= 30:
                print(progress_line(s, self.records), flush=True)
            next_t += every
            await asyncio.sleep(max(0.0, next_t - self.now()))

    async def drain(self, tasks: set[asyncio.Task]) -> None:
        if tasks:
            await asyncio.wait(tasks, timeout=self.args.timeout + 30)

    async def warmup(self, concurrency: int) -> dict[str, Any]:
        """Not measured: every question once as RAG-Token (its passages' KV enter the prefix
        cache), then one request of each kind of the mix (first-call costs), `concurrency` at once.
        """
        self.set_phase("warmup")
        start = self.now()
        todo = iter(
            [("token", q) for q in range(len(self.questions))] + [(k, 0) for k in self.mix.kinds]
        )

        async def worker() -> None:
            for kind, q in todo:
                if self.stop.is_set():
                    return
                await self.one(Rec("warmup", kind, q, self.now()), q)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        recs = [r for r in self.records if r.phase == "warmup"]
        return {
            "requests": len(recs),
            "concurrency": concurrency,
            "seconds": self.now() - start,
            "by_status": dict(Counter(r.status for r in recs)),
        }

    async def capacity(self, concurrency: int, seconds: float) -> dict[str, Any]:
        """Closed loop: `concurrency` workers, each sends its next request when the last ends."""
        self.set_phase("capacity")
        start = self.now()
        end = start + seconds
        warm = min(15.0, seconds / 4)

        async def worker() -> None:
            while not self.stop.is_set() and self.now() < end:
                rec, seed = self.mix.draw("capacity", self.now())
                await self.one(rec, seed)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        recs = [r for r in self.records if r.phase == "capacity"]
        window = [r for r in recs if start + warm <= r.end_s <= end]
        rate = sum(r.finished for r in window) / (end - start - warm)
        return {
            "concurrency": concurrency,
            "seconds": seconds,
            "warmup_s": warm,
            "requests": len(recs),
            "finished_in_window": sum(r.finished for r in window),
            "capacity_requests_per_s": rate,
            "drain_s": self.now() - end,
            "by_status": dict(Counter(r.status for r in recs)),
            "by_kind": dict(Counter(r.kind for r in window if r.finished)),
        }

    async def soak(self, rate: float, duration: float) -> dict[str, Any]:
        """Open loop: Poisson arrivals at `rate`; a request runs from its scheduled time."""
        self.set_phase("soak")
        rng = random.Random(self.args.seed)
        tasks: set[asyncio.Task] = set()
        start = self.now()
        sched, arrivals = start, 0
        while not self.stop.is_set():
            sched += rng.expovariate(rate)
            if sched > start + duration:
                break
            if (delay := sched - self.now()) > 0:
                await asyncio.sleep(delay)
            arrivals += 1
            if self.client.in_flight >= self.args.max_outstanding:
                self.unsent += 1  # the client's cap: an arrival the server could not absorb
                continue
            rec, seed = self.mix.draw("soak", sched)
            task = asyncio.create_task(self.one(rec, seed))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        end = min(self.now(), start + duration) if self.stop.is_set() else start + duration
        if (wait := end - self.now()) > 0:
            await asyncio.sleep(wait)
        end_sample = await self.sample("soak end")
        self.set_phase("drain")
        await self.drain(tasks)
        return {
            "rate_requests_per_s": rate,
            "start_s": start,
            "end_s": end,
            "duration_s": end - start,
            "arrivals": arrivals,
            "unsent": self.unsent,
            "drain_s": self.now() - end,
            "in_flight_at_end": end_sample["in_flight"],
        }


def progress_line(s: dict[str, Any], records: list[Rec]) -> str:
    recent = [r for r in records if r.end_s and r.end_s >= s["t_s"] - 30 and r.status == "OK"]
    p99 = pct([r.latency_s for r in recent], 99)
    rss = s.get("rss_mb")
    g = s.get("gauges") or {}
    errs = sum(1 for r in records if r.end_s and not r.finished)
    return (
        f"  {s['t_s']:7.1f} s {s['phase']:8s} in flight {s['in_flight']:3d}  done "
        f"{sum(1 for r in records if r.end_s):6d}  errors {errs:4d}  "
        f"p99(30 s) {'-' if p99 is None else f'{1e3 * p99:7.0f} ms'}  "
        f"rss {'-' if rss is None else f'{rss:7.1f} MB'}  running {g.get('ragmix_running_requests')}"
        f" rows {g.get('ragmix_active_rows')} queue {g.get('ragmix_queue_depth')}  "
        f"load {s['load_1m']:.2f}"
    )


# ------------------------------------------------------------------------------------- analysis


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def pcts_ms(xs: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(xs)}
    for q in (50, 90, 99):
        v = pct(xs, q)
        out[f"p{q}"] = None if v is None else 1e3 * v
    out["max"] = 1e3 * max(xs) if xs else None
    return out


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2 or max(xs) == min(xs):
        return None
    import numpy as np

    return float(np.polyfit(np.asarray(xs), np.asarray(ys), 1)[0])


def status_counts(recs: list[Rec]) -> dict[str, int]:
    return dict(sorted(Counter(r.status for r in recs).items()))


def per_bin(recs: list[Rec], start: float, duration: float, width: float) -> list[dict[str, Any]]:
    """Per `width` seconds of the soak (by scheduled time): counts and latency percentiles."""
    n_bins = max(1, math.ceil(duration / width - 1e-9))
    bins: list[list[Rec]] = [[] for _ in range(n_bins)]
    for r in recs:
        i = int((r.scheduled_s - start) // width)
        if 0 <= i < n_bins:
            bins[i].append(r)
    out = []
    for i, b in enumerate(bins):
        ok = [r for r in b if r.status == "OK"]
        row: dict[str, Any] = {
            "bin": i,
            "t0_s": i * width,
            "t1_s": min((i + 1) * width, duration),
            "full": (i + 1) * width <= duration + 1e-9,
            "requests": len(b),
            "ok": len(ok),
            "cancelled": sum(r.status == "cancelled" for r in b),
            "errors": sum(not r.finished for r in b),
            "latency_ms": pcts_ms([r.latency_s for r in ok]),
            "ttft_ms_generate": pcts_ms(
                [r.ttft_s for r in ok if r.kind in GENERATE_KINDS and r.ttft_s is not None]
            ),
            "by_kind": {k: pcts_ms([r.latency_s for r in ok if r.kind == k]) for k in KINDS},
        }
        out.append(row)
    return out


def trend(bins: list[dict[str, Any]], duration: float, key: str | None = None) -> dict[str, Any]:
    """p99 per full bin: last / first, and the fitted slope x duration relative to the median."""

    def p99(b: dict[str, Any]) -> float | None:
        d = b["latency_ms"] if key is None else b["by_kind"][key]
        return d["p99"]

    full = [(0.5 * (b["t0_s"] + b["t1_s"]), p99(b)) for b in bins if b["full"]]
    full = [(t, v) for t, v in full if v is not None]
    out: dict[str, Any] = {"bins": len(full)}
    if len(full) < 2:
        return out | {"note": "fewer than 2 full bins with OK requests: no trend"}
    ts, vs = [t for t, _ in full], [v for _, v in full]
    med = statistics.median(vs)
    slope = fit_slope(ts, vs)  # ms per s
    out.update(
        first_p99_ms=vs[0],
        last_p99_ms=vs[-1],
        median_p99_ms=med,
        last_over_first=vs[-1] / vs[0] if vs[0] else None,
        slope_ms_per_min=None if slope is None else 60 * slope,
        slope_x_duration_over_median=None if slope is None or not med else slope * duration / med,
    )
    return out


def rss_drift(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """RSS over the drift window, the last half of the soak (at most its last 300 s)."""
    window = min(300.0, (end - start) / 2)
    pts = [
        (s["t_s"], s["rss_mb"])
        for s in samples
        if s.get("rss_mb") is not None and s["phase"] == "soak" and s["t_s"] >= end - window - 1e-6
    ]
    out: dict[str, Any] = {"window_s": window, "samples": len(pts)}
    if len(pts) < 2:
        return out | {"note": "fewer than 2 RSS samples in the window"}
    (t_a, a), (t_b, b) = pts[0], pts[-1]
    slope = fit_slope([t for t, _ in pts], [v for _, v in pts])
    out.update(
        start_mb=a,
        end_mb=b,
        min_mb=min(v for _, v in pts),
        max_mb=max(v for _, v in pts),
        drift=(b - a) / a,
        slope_mb_per_min=None if slope is None else 60 * slope,
        fitted_drift=None if slope is None else slope * (t_b - t_a) / a,
    )
    return out


def checks(report: dict[str, Any]) -> dict[str, Any]:
    """pass (True) / fail (False) / not measurable (None), with the figures they rest on."""
    c: dict[str, Any] = {}
    d = report["rss"]["drift"]
    if "drift" in d:
        ok = d["drift"] < DRIFT_LIMIT and (
            d["fitted_drift"] is None or d["fitted_drift"] < DRIFT_LIMIT
        )
        c["rss_drift_below_5pct"] = {
            "pass": ok,
            "drift": d["drift"],
            "fitted_drift": d["fitted_drift"],
            "window_s": d["window_s"],
        }
    else:
        c["rss_drift_below_5pct"] = {"pass": None, "note": d.get("note", "no RSS (no --pid)")}
    t = report["latency"]["trend_p99"]
    if "last_over_first" in t and t["last_over_first"] is not None:
        a = t["last_over_first"] <= TREND_LAST_OVER_FIRST
        s = t["slope_x_duration_over_median"]
        b = s is not None and s < TREND_SLOPE_LIMIT
        c["no_upward_p99_trend"] = {
            "pass": a and b,
            "last_over_first": t["last_over_first"],
            "slope_x_duration_over_median": s,
        }
    else:
        c["no_upward_p99_trend"] = {"pass": None, "note": t.get("note", "")}
    e = report["errors"]["all"]
    bad = {k: v for k, v in e.items() if k in ("INTERNAL", "UNKNOWN", "OK_WITHOUT_DONE")}
    c["no_internal_unknown"] = {"pass": not bad, "counts": bad}
    g = report["metrics"].get("after_drain") or {}
    if g and "error" not in g:
        idle = {k: g.get(k) for k in GAUGES[:3]}
        c["gauges_idle_after_drain"] = {"pass": all(v == 0 for v in idle.values()), **idle}
    return c


# ------------------------------------------------------------------------------------- output


def print_report(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = Table = None

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}"

    soak = report["soak"]
    rows_tp = [
        (
            "capacity req/s" + (" (--rate / --load)" if report["capacity"].get("given") else ""),
            f"{report['capacity']['capacity_requests_per_s']:.3f}",
        ),
        ("target rate req/s", f"{soak['rate_requests_per_s']:.3f}"),
        ("offered req/s (arrivals)", f"{report['throughput']['offered_per_s']:.3f}"),
        ("achieved req/s (finished)", f"{report['throughput']['achieved_per_s']:.3f}"),
        ("achieved / offered", f"{report['throughput']['achieved_over_offered']:.3f}"),
        ("unsent (client cap)", str(soak["unsent"])),
        (
            "load avg start / end",
            f"{report['load_average']['start'][0]:.2f} / {report['load_average']['end'][0]:.2f}",
        ),
    ]
    bins = report["latency"]["per_bin"]
    lat_head = [
        "bin",
        "t s",
        "req",
        "ok",
        "canc",
        "err",
        "p50",
        "p90",
        "p99",
        "max",
        "ttft p50",
        "ttft p99",
    ]
    lat_rows = [
        [
            str(b["bin"]),
            f"{b['t0_s']:.0f}-{b['t1_s']:.0f}",
            str(b["requests"]),
            str(b["ok"]),
            str(b["cancelled"]),
            str(b["errors"]),
            ms(b["latency_ms"]["p50"]),
            ms(b["latency_ms"]["p90"]),
            ms(b["latency_ms"]["p99"]),
            ms(b["latency_ms"]["max"]),
            ms(b["ttft_ms_generate"]["p50"]),
            ms(b["ttft_ms_generate"]["p99"]),
        ]
        for b in bins
    ]
    kind_head = ["bin", *[f"{k} n / p50 / p99" for k in KINDS]]
    kind_rows = [
        [str(b["bin"])]
        + [f"{d['n']} / {ms(d['p50'])} / {ms(d['p99'])}" for d in (b["by_kind"][k] for k in KINDS)]
        for b in bins
    ]
    tr = report["latency"]["trend_p99"]
    trend_rows = [
        [
            "all",
            fmt(tr.get("last_over_first")),
            fmt(tr.get("slope_ms_per_min")),
            fmt(tr.get("slope_x_duration_over_median")),
        ]
    ] + [
        [
            k,
            fmt(t.get("last_over_first")),
            fmt(t.get("slope_ms_per_min")),
            fmt(t.get("slope_x_duration_over_median")),
        ]
        for k, t in report["latency"]["trend_p99_by_kind"].items()
    ]
    err_rows = [[k, str(v)] for k, v in report["errors"]["all"].items()]
    chk_rows = [
        [
            name,
            {True: "PASS", False: "FAIL", None: "n/a"}[v["pass"]],
            ", ".join(f"{k}={fmt(x)}" for k, x in v.items() if k != "pass"),
        ]
        for name, v in report["checks"].items()
    ]
    d = report["rss"]["drift"]
    rss_line = (
        f"RSS {d.get('start_mb', 0):.1f} -> {d.get('end_mb', 0):.1f} MB over the last "
        f"{d['window_s']:.0f} s: drift {fmt(d.get('drift'))}, fitted {fmt(d.get('fitted_drift'))}"
        f" ({fmt(d.get('slope_mb_per_min'))} MB/min); run max "
        f"{fmt(report['rss'].get('max_mb'))} MB"
        if "drift" in d
        else f"RSS: {d.get('note', 'not measured')}"
    )
    tables = [
        ("throughput", ["", "value"], rows_tp),
        ("soak latency per bin (ms, OK requests, from the scheduled time)", lat_head, lat_rows),
        ("latency per kind per bin (n / p50 / p99 ms)", kind_head, kind_rows),
        (
            "p99 trend over full bins",
            ["kind", "last / first", "slope ms/min", "slope x duration / median"],
            trend_rows,
        ),
        ("statuses by code (all phases)", ["status", "count"], err_rows),
        ("checks", ["check", "result", "figures"], chk_rows),
    ]
    if Console is None:
        for title, head, rows in tables:
            print(f"\n{title}\n  " + " | ".join(head))
            for r in rows:
                print("  " + " | ".join(map(str, r)))
        print(rss_line)
        return
    console = Console(width=None if sys.stdout.isatty() else 120)
    for title, head, rows in tables:
        t = Table(title=title)
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 or title == "checks" else "right")
        for r in rows:
            t.add_row(*map(str, r))
        console.print(t)
    console.print(rss_line)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_png(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    soak = report["soak"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    pts = [(s["t_s"] / 60, s["rss_mb"]) for s in report["rss"]["samples"] if s.get("rss_mb")]
    if pts:
        a1.plot([t for t, _ in pts], [v for _, v in pts], marker=".", color="C0")
    d = report["rss"]["drift"]
    if "drift" in d:
        w0 = (soak["end_s"] - d["window_s"]) / 60
        a1.axvspan(w0, soak["end_s"] / 60, color="C2", alpha=0.12, label="drift window")
    ph = report["phases_start_s"]
    for name, color in (("warmup", "C1"), ("capacity", "0.5")):
        if name in ph:
            later = [t for t in ph.values() if t > ph[name]]
            a1.axvspan(
                ph[name] / 60,
                min(later, default=ph[name]) / 60,
                color=color,
                alpha=0.12,
                label=f"{name} (+ drain)",
            )
    a1.set_ylabel("server RSS (MB)")
    a1.set_title(
        f"ragmix soak: {soak['rate_requests_per_s']:.2f} req/s "
        f"({report['params']['load']:.0%} of capacity) for {soak['duration_s']:.0f} s"
        + (f", RSS drift {d['drift']:+.1%}" if "drift" in d else ""),
        fontsize=10,
    )
    a1.legend(fontsize=8, loc="lower right")
    bins = [b for b in report["latency"]["per_bin"] if b["latency_ms"]["p99"] is not None]
    x = [(soak["start_s"] + 0.5 * (b["t0_s"] + b["t1_s"])) / 60 for b in bins]
    a2.plot(x, [b["latency_ms"]["p99"] for b in bins], marker="o", color="k", lw=2, label="all")
    for i, k in enumerate(KINDS):
        ys = [(xx, b["by_kind"][k]["p99"]) for xx, b in zip(x, bins, strict=True)]
        ys = [(xx, y) for xx, y in ys if y is not None]
        if ys:
            a2.plot(
                [p for p, _ in ys],
                [y for _, y in ys],
                lw=1,
                marker=".",
                alpha=0.7,
                color=f"C{i}",
                label=k,
            )
    a2.set_ylabel(f"p99 latency per {report['params']['bin_seconds']:g} s (ms)")
    a2.set_xlabel("minutes since start")
    a2.set_yscale("log")
    a2.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


# ------------------------------------------------------------------------------------- main


async def drive(run: Run, args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sampler = asyncio.create_task(run.sampler())
    try:
        if args.warmup_concurrency > 0:
            print(
                f"warm-up: {len(run.questions)} questions + 1 per kind, {args.warmup_concurrency} at once"
            )
            out["warmup"] = await run.warmup(args.warmup_concurrency)
            w = out["warmup"]
            print(f"  {w['requests']} requests in {w['seconds']:.1f} s: {w['by_status']}")
        if args.rate:
            out["capacity"] = {"capacity_requests_per_s": args.rate / args.load, "given": True}
            print(f"capacity not measured: soak at --rate {args.rate:g} req/s")
        else:
            c = args.capacity_concurrency or info.get("max_concurrent_requests") or 16
            print(f"capacity: closed loop, {c} in flight, {args.capacity_seconds:g} s")
            out["capacity"] = await run.capacity(c, args.capacity_seconds)
            print(
                f"  capacity {out['capacity']['capacity_requests_per_s']:.3f} req/s "
                f"(statuses {out['capacity']['by_status']}; drained in "
                f"{out['capacity']['drain_s']:.1f} s)"
            )
        out["load_average_after_capacity"] = list(os.getloadavg())
        rate = args.load * out["capacity"]["capacity_requests_per_s"]
        if not rate > 0:
            raise SystemExit("capacity is 0 requests/s: nothing finished in the capacity phase")
        if not run.stop.is_set():
            print(f"soak: Poisson arrivals at {rate:.3f} req/s for {args.duration:g} s")
            out["soak"] = await run.soak(rate, args.duration)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    await asyncio.sleep(2.0)  # let the engine publish its idle gauges
    run.set_phase("after")
    await run.sample("after drain")
    return out


def analyse(run: Run, out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    soak = out["soak"]
    start, end, dur = soak["start_s"], soak["end_s"], soak["duration_s"]
    recs = [r for r in run.records if r.phase == "soak"]
    in_window = [r for r in recs if start <= r.end_s <= end]
    bins = per_bin(recs, start, dur, args.bin_seconds)
    rss = [s["rss_mb"] for s in run.samples if s.get("rss_mb") is not None]
    by_code: dict[str, Any] = {
        "all": status_counts(run.records),
        "capacity": status_counts([r for r in run.records if r.phase == "capacity"]),
        "soak": status_counts(recs),
        "soak_by_kind": {k: status_counts([r for r in recs if r.kind == k]) for k in KINDS},
    }
    details = Counter(
        f"{r.status}: {r.detail}" for r in run.records if not r.finished or r.status != "OK"
    )
    by_code["messages"] = dict(details.most_common(20))
    ok = [r for r in recs if r.status == "OK"]
    return {
        "throughput": {
            "offered_per_s": soak["arrivals"] / dur,
            "achieved_per_s": sum(r.finished for r in in_window) / dur,
            "ok_per_s": sum(r.status == "OK" for r in in_window) / dur,
            "achieved_over_offered": sum(r.finished for r in in_window) / max(1, soak["arrivals"]),
            "generated_tokens": sum(r.tokens for r in recs),
            "by_kind_per_s": {k: sum(r.kind == k for r in in_window) / dur for k in KINDS},
        },
        "errors": by_code,
        "cancellations": {
            "planned": sum(r.cancel_after is not None for r in recs),
            "done": sum(r.status == "cancelled" for r in recs),
            "generate_requests": sum(r.kind in GENERATE_KINDS for r in recs),
        },
        "rss": {
            "samples": [
                {k: s.get(k) for k in ("t_s", "phase", "rss_mb", "in_flight", "load_1m", "note")}
                for s in run.samples
            ],
            "min_mb": min(rss) if rss else None,
            "max_mb": max(rss) if rss else None,
            "drift": rss_drift(run.samples, start, end),
        },
        "latency": {
            "overall_ms": pcts_ms([r.latency_s for r in ok]),
            "by_kind_ms": {k: pcts_ms([r.latency_s for r in ok if r.kind == k]) for k in KINDS},
            "ttft_ms_by_kind": {
                k: pcts_ms([r.ttft_s for r in ok if r.kind == k and r.ttft_s is not None])
                for k in GENERATE_KINDS
            },
            "bin_seconds": args.bin_seconds,
            "per_bin": bins,
            "trend_p99": trend(bins, dur),
            "trend_p99_by_kind": {k: trend(bins, dur, k) for k in KINDS},
        },
    }


def start_server(args: argparse.Namespace, log: Path) -> tuple[Any, int]:
    from serving import Server, free_port

    metrics_port = args.metrics_port or free_port()
    server_args = ["--metrics-port", str(metrics_port)]
    if args.threads is not None:
        server_args += ["--threads", str(args.threads)]
    server_args += args.server_arg
    print(f"starting `ragmix serve {' '.join(server_args)}` (log {log})", flush=True)
    t = time.perf_counter()
    server = Server(server_args, log, timeout=args.startup_timeout)
    print(f"server pid {server.proc.pid} on {server.target} after {time.perf_counter() - t:.0f} s")
    return server, metrics_port


def stop_server(server: Any, grace: float) -> dict[str, Any]:
    """SIGTERM, wait for the drain; SIGKILL only past grace + 30 s."""
    proc = server.proc
    out: dict[str, Any] = {"killed": False}
    t = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace + 30)
        except subprocess.TimeoutExpired:
            out["killed"] = True
            proc.kill()
            proc.wait()
    else:
        out["note"] = "the server had exited before the SIGTERM"
    out["exit_code"] = proc.returncode
    out["stop_s"] = time.perf_counter() - t
    server.stop()  # closes the log file
    return out


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    p.add_argument("--capacity-seconds", type=float, default=60.0, help="closed-loop seconds")
    p.add_argument(
        "--warmup-concurrency",
        type=int,
        default=4,
        help="unmeasured warm-up first (every question once + each kind), this many at once; 0: off",
    )
    p.add_argument(
        "--capacity-concurrency", type=int, default=0, help="0: GetInfo max_concurrent_requests"
    )
    p.add_argument("--rate", type=float, default=0.0, help="skip the capacity phase: req/s to soak")
    p.add_argument("--load", type=float, default=0.7, help="soak rate as a fraction of capacity")
    p.add_argument(
        "--mix", default=DEFAULT_MIX, help="kind=weight,... (kinds: " + ", ".join(KINDS) + ")"
    )
    p.add_argument("--cancel-fraction", type=float, default=0.1, help="of the Generate streams")
    p.add_argument("--max-new-tokens", type=int, default=24, help="per Generate request")
    p.add_argument("--top-k", type=int, default=3, help="passages per request")
    p.add_argument("--num-beams", type=int, default=2, help="SEQUENCE beams per passage")
    p.add_argument(
        "--temperature", type=float, default=0.7, help="TOKEN / CONCAT (0: greedy); seeded"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="gRPC deadline per request, s")
    p.add_argument("--max-outstanding", type=int, default=256, help="client cap on requests")
    p.add_argument("--seed", type=int, default=0, help="arrivals, mix, cancel points, sampling")
    p.add_argument("--sample-seconds", type=float, default=10.0, help="RSS / gauge sampling")
    p.add_argument("--bin-seconds", type=float, default=60.0, help="latency percentile bins")
    p.add_argument("--threads", type=int, default=None, help="passed to `ragmix serve --threads`")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `ragmix serve` flag (repeatable; --server-arg=--max-batch-rows=96)",
    )
    p.add_argument("--startup-timeout", type=float, default=900.0, help="s (may build bundles)")
    p.add_argument("--grace-seconds", type=float, default=30.0, help="wait for the SIGTERM drain")
    p.add_argument("--server-log", type=Path, default=None, help="keep the server's log here")
    p.add_argument("--target", default=None, help="HOST:PORT of a running server (none started)")
    p.add_argument("--pid", type=int, default=None, help="with --target: its pid, for RSS")
    p.add_argument("--metrics-port", type=int, default=0, help="its /metrics port (0: pick one)")
    p.add_argument("--raw", action="store_true", help="every request's record in the JSON")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="PNG: same name .png")
    args = p.parse_args(argv)
    if not 0 < args.load <= 2 or not 0 <= args.cancel_fraction <= 1:
        p.error("--load must be in (0, 2] and --cancel-fraction in [0, 1]")
    weights = parse_mix(args.mix)
    sys.path.insert(0, str(HERE))

    from serving import machine_info, write_json

    from ragmix.bench.loadgen import BUILTIN_QUESTIONS

    report: dict[str, Any] = {
        "machine": machine_info(),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "mix": weights,
    }
    load_start = list(os.getloadavg())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        log = args.server_log or Path(tmp) / "server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        server = None
        if args.target:
            target, pid, metrics_port = args.target, args.pid, args.metrics_port or None
        else:
            server, metrics_port = start_server(args, log)
            target, pid = server.target, server.proc.pid
        report["server"] = {"target": target, "pid": pid, "metrics_port": metrics_port}
        try:
            report.update(
                asyncio.run(
                    main_async(
                        args, weights, list(BUILTIN_QUESTIONS), target, pid, metrics_port, server
                    )
                )
            )
        finally:
            if server is not None:
                report["server"]["stop"] = stop_server(server, args.grace_seconds)
                report["server"]["log"] = scan_log(log)
                print(f"server stopped: {report['server']['stop']}")
    report["load_average"] = {
        "start": load_start,
        "after_capacity": report.pop("load_average_after_capacity", None),
        "end": list(os.getloadavg()),
    }
    report["checks"] = checks(report)
    report["elapsed_s"] = time.perf_counter() - t_start
    print_report(report)
    if server is not None:
        lg = report["server"]["log"]
        print(
            f"server exit code {report['server']['stop']['exit_code']}; log: {lg.get('lines')} "
            f"lines, {lg.get('suspect_lines')} suspect, {lg.get('tracebacks')} tracebacks"
        )
        for line in lg.get("first_suspect_lines", [])[:5]:
            print(f"  {line}")
    write_json(args.out, report)
    png = args.out.with_suffix(".png")
    if write_png(report, png):
        print(f"wrote {png}")
    return 0 if all(c["pass"] is not False for c in report["checks"].values()) else 1


async def main_async(
    args: argparse.Namespace,
    weights: dict[str, float],
    questions: list[str],
    target: str,
    pid: int | None,
    metrics_port: int | None,
    server: Any,
) -> dict[str, Any]:
    client = Client(target, args)
    try:
        info = await client.connect()
        print(f"server: {info}")
        run = Run(client, Mix(weights, args, len(questions)), questions, args)
        run.pid, run.metrics_port = pid, metrics_port
        run.proc = server.proc if server is not None else None
        before = await safe_scrape(metrics_port)
        out = await drive(run, args, info)
        after = await safe_scrape(metrics_port)
    finally:
        await client.close()
    out["info"] = info
    if "soak" not in out:
        raise SystemExit(f"the run stopped before the soak: {run.stop_reason}")
    out["stop_reason"] = run.stop_reason or "completed"
    out["phases_start_s"] = run.phases
    out.update(analyse(run, out, args))
    out["metrics"] = {
        "before": {g: before.get(g) for g in GAUGES}
        if before and "error" not in before
        else before,
        "after_drain": {g: after.get(g) for g in GAUGES}
        if after and "error" not in after
        else after,
        "server_rpc_counts": rpc_counts(before, after),
        "gauge_samples": [
            {"t_s": s["t_s"], **(s.get("gauges") or {})} for s in run.samples if "gauges" in s
        ],
    }
    if args.raw:
        out["records"] = [asdict(r) for r in run.records]
    return out


if __name__ == "__main__":
    sys.exit(main())
