"""Streaming-aware load generator for a ragmix server.

Whole-call gRPC load tools (ghz) time a stream as one call; what a user of a token stream feels is the
time to the first token and the gaps between tokens. This drives `RagService.Generate` over grpc.aio
and times every stream event:

- closed loop: N workers, each sends its next request when the previous one ends (`--concurrency`);
- open loop: Poisson arrivals at a fixed rate (`--rate`), latency counted from the *scheduled* send
  time, so a slow server cannot hide its queueing by slowing the client (no coordinated omission).

Every run is bounded by a duration and/or a request count, and every request by a deadline, so it
always stops by itself. Heavy imports (grpc, numpy, rich, matplotlib) are deferred so that building
the `ragmix` command line stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import itertools
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ragmix.errors import UnavailableError, ValidationError

LOG = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)
PCT_KEYS = ("p50", "p90", "p95", "p99", "max")
MIXTURES = ("token", "sequence", "concat")
#: Questions sent when no --questions file is given: the default index is the Python reference.
BUILTIN_QUESTIONS: tuple[str, ...] = (
    "What does the yield statement do?",
    "How is a generator function different from a normal function?",
    "What does yield from do in a generator?",
    "How do decorators work in Python?",
    "What does the with statement do?",
    "What methods does a context manager define?",
    "How do I define a class in Python?",
    "What does __init__ do in a class?",
    "How does inheritance work for classes?",
    "How are exceptions raised in Python?",
    "What does a try statement with finally do?",
    "What happens when an exception is not handled?",
    "How does a for loop iterate over an object?",
    "What does the else clause of a loop do?",
    "How does the import statement find a module?",
    "What is the difference between return and yield?",
    "What does the global statement do?",
    "How are default argument values evaluated?",
    "What is a lambda expression?",
    "How does the async with statement work?",
)


# ------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class LoadSpec:
    """One load-generator invocation. A list of levels (concurrencies or rates) is a sweep."""

    target: str
    """Server address host:port. The generator sends to this address only."""
    concurrency: tuple[int, ...] = (1,)
    """Closed loop: streams kept in flight, one run per value. Ignored when `rate` is given."""
    rate: tuple[float, ...] = ()
    """Open loop: mean arrivals per second (Poisson), one run per value. Empty: closed loop."""
    duration_s: float | None = None
    """Measured seconds per level (after warm-up). With neither bound: 10 s."""
    requests: int | None = None
    """Measured requests per level (after warm-up). The first bound reached ends the level."""
    warmup_s: float = 0.0
    """Requests sent during the first warmup_s seconds of a level are not measured."""
    warmup_requests: int = 0
    """The first warmup_requests requests of a level are not measured."""
    questions: tuple[str, ...] = BUILTIN_QUESTIONS
    """Sent round-robin."""
    mixture: str = "token"
    top_k: int = 0
    """Passages per question (0: server default)."""
    max_new_tokens: int = 0
    """0: server default."""
    temperature: float = 0.0
    """0: greedy."""
    seed: int | None = None
    """Sampling seed sent with every request (None: unset)."""
    max_outstanding: int = 64
    """Open loop: most requests in flight; an arrival beyond it waits, and its wait counts."""
    timeout_s: float = 60.0
    """gRPC deadline of each request; also bounds the drain at the end of a level."""
    connect_timeout_s: float = 10.0
    channels: int = 1
    """grpc.aio channels (HTTP/2 connections), used round-robin."""
    arrival_seed: int = 0
    """Seed of the open loop's Poisson arrival times, so runs are repeatable."""

    def __post_init__(self) -> None:
        if not self.target or ":" not in self.target:
            raise ValidationError("target", f"target must be host:port, got {self.target!r}.")
        if self.rate:
            if any(not (r > 0 and math.isfinite(r)) for r in self.rate):
                raise ValidationError("rate", f"rate must be > 0 per second, got {self.rate}.")
        elif not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValidationError(
                "concurrency", f"concurrency must be integers >= 1, got {self.concurrency}."
            )
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValidationError("duration", f"duration must be > 0 s, got {self.duration_s}.")
        if self.requests is not None and self.requests < 1:
            raise ValidationError("requests", f"requests must be >= 1, got {self.requests}.")
        if self.warmup_s < 0 or self.warmup_requests < 0:
            raise ValidationError("warmup", "warmup must be >= 0.")
        if not self.questions:
            raise ValidationError("questions", "the question list is empty.")
        if self.mixture not in MIXTURES:
            raise ValidationError(
                "mixture", f"mixture must be one of {', '.join(MIXTURES)}, got {self.mixture!r}."
            )
        for name in ("max_outstanding", "channels"):
            if getattr(self, name) < 1:
                raise ValidationError(name, f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.timeout_s > 0:
            raise ValidationError("timeout", f"timeout must be > 0 s, got {self.timeout_s}.")

    @property
    def mode(self) -> str:
        return "open" if self.rate else "closed"

    @property
    def levels(self) -> tuple[float, ...]:
        return self.rate if self.rate else self.concurrency

    @property
    def bounds(self) -> tuple[float | None, int | None]:
        """(duration_s, requests) with the 10 s default when neither is set."""
        if self.duration_s is None and self.requests is None:
            return 10.0, None
        return self.duration_s, self.requests

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["questions"] = len(self.questions)
        d["mode"] = self.mode
        d["duration_s"], d["requests"] = self.bounds
        return d


# ------------------------------------------------------------------------------------- records


@dataclass
class RequestRecord:
    """One Generate call. Times are seconds from the start of its level (perf_counter)."""

    index: int
    question: int
    warmup: bool
    scheduled_s: float
    """When it should have been sent: closed loop = sent_s, open loop = its Poisson arrival."""
    sent_s: float
    end_s: float = math.nan
    token_times_s: list[float] = field(default_factory=list)
    """Arrival of each token event (the passages event is not a token)."""
    generated_tokens: int = 0
    status: str = "OK"
    """gRPC status code name."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.scheduled_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.scheduled_s

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in itertools.pairwise(t)]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "question": self.question,
            "warmup": self.warmup,
            "scheduled_s": self.scheduled_s,
            "sent_s": self.sent_s,
            "end_s": self.end_s,
            "ttft_ms": None if self.ttft_s is None else 1e3 * self.ttft_s,
            "e2e_ms": 1e3 * self.e2e_s,
            "itl_ms": [1e3 * x for x in self.itl_s],
            "generated_tokens": self.generated_tokens,
            "status": self.status,
            "error": self.error,
        }


@dataclass
class LevelResult:
    """All requests of one concurrency (closed loop) or one rate (open loop)."""

    mode: str
    level: float
    records: list[RequestRecord]
    measure_start_s: float
    """Start of the measured window: the first measured request's scheduled time."""
    unsent: int = 0
    """Open loop: arrivals inside the window still waiting for a slot when the window closed."""

    @property
    def label(self) -> str:
        return f"c={self.level:g}" if self.mode == "closed" else f"rate={self.level:g}/s"

    def summary(self) -> dict[str, Any]:
        measured = [r for r in self.records if not r.warmup]
        ok = [r for r in measured if r.ok]
        end = max((r.end_s for r in measured), default=self.measure_start_s)
        window = max(end - self.measure_start_s, 1e-9)
        tokens = sum(r.generated_tokens for r in ok)
        return {
            "mode": self.mode,
            "concurrency": int(self.level) if self.mode == "closed" else None,
            "rate_per_s": self.level if self.mode == "open" else None,
            "requests": len(measured),
            "ok": len(ok),
            "errors": len(measured) - len(ok),
            "errors_by_code": dict(Counter(r.status for r in measured if not r.ok)),
            "warmup_requests": len(self.records) - len(measured),
            "unsent": self.unsent,
            "duration_s": window,
            "requests_per_s": len(ok) / window,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / window,
            "tokens_per_request": tokens / len(ok) if ok else None,
            "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
            "itl_ms": percentiles([x for r in ok for x in r.itl_s]),
            "e2e_ms": percentiles([r.e2e_s for r in ok]),
            "send_lag_ms": percentiles([r.sent_s - r.scheduled_s for r in measured]),
        }


def percentiles(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p95/p99/max/mean in milliseconds (linear interpolation, so they are ordered)."""
    import numpy as np

    out: dict[str, float | int | None] = {"n": len(values_s)}
    if not values_s:
        return out | {f"p{q}": None for q in PERCENTILES} | {"max": None, "mean": None}
    ms = 1e3 * np.asarray(values_s, dtype=np.float64)  # n
    for q, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True):
        out[f"p{q}"] = float(v)
    out["max"] = float(ms.max())
    out["mean"] = float(ms.mean())
    return out


# ------------------------------------------------------------------------------------- running


class _Client:
    """A small pool of grpc.aio channels to one target and the request every call sends."""

    def __init__(self, spec: LoadSpec) -> None:
        import grpc

        from ragmix_client.proto import ragmix_pb2 as pb
        from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

        self.spec = spec
        self._grpc = grpc
        self._pb = pb
        self.channels = [grpc.aio.insecure_channel(spec.target) for _ in range(spec.channels)]
        self.stubs = [pb_grpc.RagServiceStub(ch) for ch in self.channels]
        mixture = {"token": 1, "sequence": 2, "concat": 3}[spec.mixture]
        self.requests = []
        for q in spec.questions:
            decoding = pb.DecodingParams(
                max_new_tokens=spec.max_new_tokens, temperature=spec.temperature
            )
            if spec.seed is not None:
                decoding.seed = spec.seed
            self.requests.append(
                pb.GenerateRequest(query=q, top_k=spec.top_k, mixture=mixture, decoding=decoding)
            )

    async def connect(self) -> dict[str, Any]:
        """Wait for every channel, then return the server's GetInfo (or the reason it failed)."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(ch.channel_ready() for ch in self.channels)),
                self.spec.connect_timeout_s,
            )
        except TimeoutError:
            raise UnavailableError(
                f"cannot reach {self.spec.target} within {self.spec.connect_timeout_s:g} s: "
                "is `ragmix serve` running there?"
            ) from None
        try:
            r = await self.stubs[0].GetInfo(self._pb.GetInfoRequest(), timeout=10)
        except self._grpc.aio.AioRpcError as e:
            return {"error": f"{e.code().name}: {e.details()}"}
        return {
            "version": r.version,
            "generator": r.generator,
            "encoder": r.encoder,
            "passages": r.passages,
            "max_top_k": r.max_top_k,
            "max_new_tokens": r.max_new_tokens,
        }

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels))

    async def generate(self, rec: RequestRecord, t0: float) -> RequestRecord:
        """Send one request and time its events; every failure becomes a status code name."""
        stub = self.stubs[rec.index % len(self.stubs)]
        rec.sent_s = time.perf_counter() - t0
        call = stub.Generate(self.requests[rec.question], timeout=self.spec.timeout_s)
        done_tokens = None
        try:
            async for msg in call:
                kind = msg.WhichOneof("event")
                if kind == "token":
                    rec.token_times_s.append(time.perf_counter() - t0)
                elif kind == "done":
                    done_tokens = msg.done.usage.generated_tokens
        except self._grpc.aio.AioRpcError as e:
            rec.status, rec.error = e.code().name, e.details() or ""
        rec.end_s = time.perf_counter() - t0
        rec.generated_tokens = done_tokens if done_tokens is not None else len(rec.token_times_s)
        return rec


OnDone = Callable[[RequestRecord, float | None], None]


async def _closed_loop(client: _Client, spec: LoadSpec, c: int, on_done: OnDone) -> LevelResult:
    """c workers; each sends its next request when its previous one has ended."""
    duration, limit = spec.bounds
    t0 = time.perf_counter()
    records: list[RequestRecord] = []
    state = {"issued": 0, "measured": 0, "start": None}

    def take() -> RequestRecord | None:
        now = time.perf_counter() - t0
        i = state["issued"]
        warm = i < spec.warmup_requests or now < spec.warmup_s
        if not warm:
            if state["start"] is None:
                state["start"] = now
            if limit is not None and state["measured"] >= limit:
                return None
            if duration is not None and now >= state["start"] + duration:
                return None
            state["measured"] += 1
        state["issued"] += 1
        rec = RequestRecord(i, i % len(spec.questions), warm, now, now)
        records.append(rec)
        return rec

    async def worker() -> None:
        while (rec := take()) is not None:
            await client.generate(rec, t0)
            on_done(rec, state["start"])

    await asyncio.gather(*(worker() for _ in range(c)))
    start = state["start"] if state["start"] is not None else time.perf_counter() - t0
    return LevelResult("closed", c, records, start)


async def _open_loop(client: _Client, spec: LoadSpec, rate: float, on_done: OnDone) -> LevelResult:
    """Poisson arrivals; latency counts from each arrival's scheduled time, not its send."""
    duration, limit = spec.bounds
    rng = random.Random(spec.arrival_seed)
    slots = asyncio.Semaphore(spec.max_outstanding)
    t0 = time.perf_counter()
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task] = set()
    start: float | None = None
    sched, i, measured, unsent = 0.0, 0, 0, 0

    async def one(rec: RequestRecord) -> None:
        try:
            await client.generate(rec, t0)
        finally:
            slots.release()
        on_done(rec, start)

    while True:
        sched += rng.expovariate(rate)
        warm = i < spec.warmup_requests or sched < spec.warmup_s
        if not warm:
            if start is None:
                start = sched
            if limit is not None and measured >= limit:
                break
            if duration is not None and sched > start + duration:
                break
        if (delay := sched - (time.perf_counter() - t0)) > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        if not warm and duration is not None and time.perf_counter() - t0 > start + duration:
            # The server is behind: stop here and count what the window still held.
            slots.release()
            unsent = 1
            while (sched := sched + rng.expovariate(rate)) <= start + duration:
                unsent += 1
            break
        measured += not warm
        rec = RequestRecord(i, i % len(spec.questions), warm, sched, sched)
        records.append(rec)
        task = asyncio.create_task(one(rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks)
    return LevelResult("open", rate, records, start if start is not None else sched, unsent)


async def run_load(
    spec: LoadSpec, *, progress: bool = True
) -> tuple[dict[str, Any], list[LevelResult]]:
    """Run every level of the spec in turn; return (server info, results)."""
    client = _Client(spec)
    try:
        info = await client.connect()
        results = []
        for level in spec.levels:
            with _Progress(spec, level, enabled=progress) as bar:
                if spec.mode == "closed":
                    res = await _closed_loop(client, spec, int(level), bar.update)
                else:
                    res = await _open_loop(client, spec, float(level), bar.update)
            results.append(res)
    finally:
        await client.close()
    return info, results


class _Progress:
    """A rich progress bar per level: by measured requests, or by measured seconds."""

    def __init__(self, spec: LoadSpec, level: float, *, enabled: bool) -> None:
        self.spec, self.enabled = spec, enabled
        self.duration, self.limit = spec.bounds
        self.label = f"c={level:g}" if spec.mode == "closed" else f"rate={level:g}/s"
        self.done = self.errors = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            total = self.limit if self.limit is not None else self.duration
            self.task = self.bar.add_task(self.label, total=total, status="warm-up")
            self.bar.start()
        return self

    def update(self, rec: RequestRecord, start: float | None) -> None:
        if not self.enabled or rec.warmup:
            return
        self.done += 1
        self.errors += not rec.ok
        if self.limit is not None:
            completed = float(self.done)
        else:
            elapsed = time.perf_counter() - self.t0 - (start or 0.0)
            completed = min(elapsed, self.duration or 0.0)
        self.bar.update(
            self.task, completed=completed, status=f"{self.done} done, {self.errors} errors"
        )

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            if exc[0] is None:  # the level ended: its bound was reached
                self.bar.update(self.task, completed=self.bar.tasks[0].total)
            self.bar.stop()


# ------------------------------------------------------------------------------------- output


def build_report(
    spec: LoadSpec, info: dict[str, Any], results: list[LevelResult], *, raw: bool = False
) -> dict[str, Any]:
    """Every figure of the run, its parameters, the server and the client machine, as JSON data."""
    from ragmix import __version__

    runs = []
    for res in results:
        run: dict[str, Any] = {"label": res.label, "summary": res.summary()}
        if raw:
            run["records"] = [r.to_json() for r in res.records]
        runs.append(run)
    return {
        "tool": "ragmix bench load",
        "version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "params": spec.params(),
        "server": info,
        "client": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "runs": runs,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, report: dict[str, Any]) -> Path:
    _atomic_write(Path(path), (json.dumps(report, indent=2) + "\n").encode())
    return Path(path)


def write_plots(results: list[LevelResult], out_dir: Path) -> list[Path]:
    """latency_cdf.png (TTFT, ITL, e2e per level); for a sweep also sweep_throughput.png and
    sweep_ttft.png against the level (concurrency or rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    written = []

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        _atomic_write(out_dir / name, buf.getvalue())
        written.append(out_dir / name)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, get) in zip(
        axes,
        (
            ("time to first token", lambda r: [r.ttft_s] if r.ttft_s is not None else []),
            ("inter-token latency", lambda r: r.itl_s),
            ("end-to-end latency", lambda r: [r.e2e_s]),
        ),
        strict=True,
    ):
        for res in results:
            ms = np.sort([1e3 * x for r in res.records if r.ok and not r.warmup for x in get(r)])
            if ms.size:
                ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=res.label)  # n, n
        ax.set(title=title, xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    save(fig, "latency_cdf.png")

    if len(results) > 1:
        summaries = [r.summary() for r in results]
        x = [r.level for r in results]
        xlabel = "concurrency (streams)" if results[0].mode == "closed" else "arrival rate (1/s)"
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [s["tokens_per_s"] for s in summaries], "o-", label="generated tokens/s")
        ax.set(title="throughput", xlabel=xlabel, ylabel="tokens/s")
        _level_axis(ax, x)
        ax.grid(alpha=0.3)
        save(fig, "sweep_throughput.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        for q in ("p50", "p99"):
            y = [s["ttft_ms"][q] if s["ttft_ms"][q] is not None else np.nan for s in summaries]
            ax.plot(x, y, "o-", label=f"TTFT {q}")
        ax.set(title="time to first token", xlabel=xlabel, ylabel="ms")
        _level_axis(ax, x)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "sweep_ttft.png")
    return written


def _level_axis(ax: Any, x: list[float]) -> None:
    """Log-2 axis (sweeps double the level) labelled with the levels themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()


def print_summary(report: dict[str, Any], file: Any = None) -> None:
    """Throughput per level, then TTFT / ITL / e2e percentiles, then errors by status code."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    p = report["params"]
    head = Table(title=f"ragmix load — {p['target']}, {p['mode']} loop, mixture {p['mixture']}")
    for col in ("level", "requests", "ok", "errors", "req/s", "tokens/s", "tok/req", "window s"):
        head.add_column(col, justify="right")
    lat = Table(title="latency (ms)")
    for col in ("level", "metric", "n", "p50", "p90", "p95", "p99", "max"):
        lat.add_column(col, justify="right")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    errors = []
    for run in report["runs"]:
        s = run["summary"]
        tpr = s["tokens_per_request"]
        head.add_row(
            run["label"],
            str(s["requests"]),
            str(s["ok"]),
            str(s["errors"]),
            f"{s['requests_per_s']:.2f}",
            f"{s['tokens_per_s']:.1f}",
            "-" if tpr is None else f"{tpr:.1f}",
            f"{s['duration_s']:.2f}",
        )
        for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("e2e", "e2e_ms")):
            d = s[key]
            lat.add_row(run["label"], name, str(d["n"]), *(ms(d[q]) for q in PCT_KEYS))
        if s["errors_by_code"]:
            codes = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_code"].items()))
            errors.append(f"{run['label']}: {codes}")
        if s["unsent"]:
            errors.append(f"{run['label']}: {s['unsent']} arrivals not sent (server behind)")
    console.print(head)
    console.print(lat)
    for line in errors:
        console.print(f"[red]errors[/red] {line}")


# ------------------------------------------------------------------------------------- command line


def read_questions(path: Path) -> tuple[str, ...]:
    """One question per line, or JSONL objects with a "question" or "query" field."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValidationError("questions", f"{path}:{n}: invalid JSON ({e}).") from None
            q = obj.get("question") or obj.get("query")
            if not isinstance(q, str) or not q.strip():
                raise ValidationError(
                    "questions", f'{path}:{n}: a JSON line needs a "question" or "query" string.'
                )
            out.append(q.strip())
        else:
            out.append(line)
    if not out:
        raise ValidationError("questions", f"{path} holds no questions.")
    return tuple(out)


def _parse_list(text: str, typ: type, name: str) -> tuple:
    try:
        return tuple(typ(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValidationError(
            name, f"{name} must be a number or a list like 1,2,4, got {text!r}."
        ) from None


def _parse_warmup(text: str) -> tuple[float, int]:
    """'2s' or '1.5s': seconds; '5': requests."""
    t = text.strip().lower()
    try:
        return (float(t[:-1]), 0) if t.endswith("s") else (0.0, int(t))
    except ValueError:
        raise ValidationError(
            "warmup", f"warmup must be seconds like 2s or a request count like 5, got {text!r}."
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument(
        "--concurrency",
        default="1",
        help="closed loop: streams in flight; a list (1,2,4,8,16) runs a sweep (default: 1)",
    )
    p.add_argument(
        "--rate",
        default=None,
        help="open loop: Poisson arrivals per second; a list runs a sweep (overrides --concurrency)",
    )
    p.add_argument("--duration", type=float, default=None, help="measured seconds per level")
    p.add_argument("--requests", type=int, default=None, help="measured requests per level")
    p.add_argument(
        "--warmup",
        default="0",
        help="not measured, per level: seconds (2s) or a request count (5) (default: 0)",
    )
    p.add_argument("--questions", type=Path, default=None, help="text (one per line) or JSONL")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.add_argument("--raw", action="store_true", help="add every request's record to the JSON")
    p.add_argument("--mixture", choices=MIXTURES, default="token")
    p.add_argument("--top-k", type=int, default=0, help="passages (0: server default)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: server default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None, help="sampling seed sent with each request")
    p.add_argument("--max-outstanding", type=int, default=64, help="open loop: in-flight cap")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections)")
    p.add_argument("--arrival-seed", type=int, default=0, help="open loop: arrival-time seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    warmup_s, warmup_n = _parse_warmup(args.warmup)
    return LoadSpec(
        target=args.target,
        concurrency=_parse_list(args.concurrency, int, "concurrency"),
        rate=_parse_list(args.rate, float, "rate") if args.rate else (),
        duration_s=args.duration,
        requests=args.requests,
        warmup_s=warmup_s,
        warmup_requests=warmup_n,
        questions=read_questions(args.questions) if args.questions else BUILTIN_QUESTIONS,
        mixture=args.mixture,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        max_outstanding=args.max_outstanding,
        timeout_s=args.timeout,
        channels=args.channels,
        arrival_seed=args.arrival_seed,
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run, print the summary, write the JSON and plots. Exit 0 even when requests failed: the
    errors are figures of the run, counted by status code."""
    spec = spec_from_args(args)
    info, results = asyncio.run(run_load(spec, progress=not args.quiet))
    report = build_report(spec, info, results, raw=args.raw)
    if not args.quiet:
        print_summary(report)
    if args.out:
        print(f"wrote {write_json(args.out, report)}", file=sys.stderr)
    if args.plots:
        for path in write_plots(results, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="loadgen", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_cli(args)
    except (ValidationError, UnavailableError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
