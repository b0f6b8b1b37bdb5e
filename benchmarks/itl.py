"""Inter-token latency under interference (the engine core's chunked prefill), in one process.

Four RAG-Token streams (K = 5, greedy, warm passage cache) run against ragmix's engine in this
process (asyncio API, no gRPC); their per-token arrival gaps (ITL) are measured

  alone: nothing else in flight (every gap after all four are streaming);
  (a)    beside one RAG-Sequence request (num_beams 4, K = 5, --max-new-tokens, "thorough"
         rescoring), started once the four are streaming: gaps while it is in flight;
  (b)    beside a stream of new requests over cold passages (passage_ids of index passages no
         request has used before, so every prompt is prefilled from scratch, chunk by chunk),
         each sent when the previous one got its first token: gaps over that window.

An observer records every step (rows, requests, seconds) and every prefill pass (rows, tokens,
seconds). A "full chunk" is a prefill pass that computed >= 0.9 x --max-prefill-tokens tokens (its
padded size is at least that and at most the budget). Goal (the issue): p99 ITL of the streams in
(a) and (b) exceeds p99 alone by at most one chunk's time, taken as the p99 of the full-chunk
passes of the same run (max reported too). Also: the RAG-Sequence request's e2e time alone against
a RAG-Token request of the same length alone (same question, max = min new tokens = the sequence
answer's length; goal <= 3x).

Rounds (--rounds) run alone, (a), (b) in turn so a drifting machine load falls on all three alike.

    python benchmarks/itl.py                          # 4 questions, 32 tokens, 3 rounds
    python benchmarks/itl.py --max-new-tokens 4 --rounds 1 --cold-requests 2   # smoke test

Results: benchmarks/results/itl.json (written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOG = logging.getLogger(__name__)

STREAMS = 4
TOP_K = 5
NUM_BEAMS = 4
FULL_CHUNK = 0.9  # a prefill pass of >= this x max_prefill_tokens computed tokens is a full chunk


# ------------------------------------------------------------------------------------- recording


def _observer_class() -> type:
    from ragmix.engine.observer import EngineObserver

    class StepRecorder(EngineObserver):
        """Every step and prefill pass, timestamped (perf_counter at the end of each)."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.steps: list[dict[str, Any]] = []
            self.prefills: list[dict[str, Any]] = []
            self._pending: dict[str, Any] | None = None  # this step's prefill pass, if any

        def on_prefill(self, rows: int, tokens: int, cached_tokens: int, seconds: float) -> None:
            p = {
                "t": time.perf_counter(),
                "rows": rows,
                "tokens": tokens,
                "cached_tokens": cached_tokens,
                "s": seconds,
            }
            with self.lock:
                self.prefills.append(p)
                self._pending = p

        def on_step(self, rows: int, requests: int, seconds: float) -> None:
            with self.lock:
                p, self._pending = self._pending, None
                self.steps.append(
                    {
                        "t": time.perf_counter(),
                        "rows": rows,
                        "requests": requests,
                        "s": seconds,
                        "prefill_tokens": p["tokens"] if p else 0,
                        "prefill_s": p["s"] if p else 0.0,
                    }
                )

        def between(self, t0: float, t1: float) -> tuple[list[dict], list[dict]]:
            with self.lock:
                return (
                    [s for s in self.steps if t0 <= s["t"] <= t1],
                    [p for p in self.prefills if t0 <= p["t"] <= t1],
                )

    return StepRecorder


@dataclass
class Stream:
    """One generate call, timed on the event loop: perf_counter at submit, each token, the end."""

    label: str
    submit: float = 0.0
    tokens: list[float] = field(default_factory=list)
    end: float = 0.0
    generated: int = 0
    passage_ids: list[str] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def e2e_s(self) -> float:
        return self.end - self.submit

    def gaps(self, t0: float, t1: float) -> list[float]:
        """Gaps between consecutive tokens whose interval overlaps [t0, t1]."""
        t = self.tokens
        return [b - a for a, b in itertools.pairwise(t) if b > t0 and a < t1]


async def run_stream(engine: Any, s: Stream, retrieval: Any, decoding: Any, mixture: Any) -> Stream:
    from ragmix.engine.outputs import DoneEvent, PassagesEvent, TokenEvent

    s.submit = time.perf_counter()
    async for ev in engine.generate(retrieval, decoding, mixture):
        if isinstance(ev, TokenEvent):
            s.tokens.append(time.perf_counter())
            s.first.set()
        elif isinstance(ev, PassagesEvent):
            s.passage_ids = [p.id for p in ev.passages]
        elif isinstance(ev, DoneEvent):
            s.generated = ev.usage.generated_tokens
    s.end = time.perf_counter()
    s.first.set()  # a request that ended without a token must not block its waiter
    return s


def token_params(question: str, n: int, force: bool = True) -> tuple[Any, Any, Any]:
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    return (
        RetrievalParams(question, top_k=TOP_K),
        DecodingParams(max_new_tokens=n, min_new_tokens=n if force else 0, temperature=0.0),
        Mixture.TOKEN,
    )


def sequence_params(question: str, n: int) -> tuple[Any, Any, Any]:
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    return (
        RetrievalParams(question, top_k=TOP_K),
        DecodingParams(max_new_tokens=n, temperature=0.0, num_beams=NUM_BEAMS),
        Mixture.SEQUENCE,
    )


def cold_params(question: str, passage_ids: list[str], n: int) -> tuple[Any, Any, Any]:
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    return (
        RetrievalParams(question, passage_ids=passage_ids),
        DecodingParams(max_new_tokens=n, temperature=0.0),
        Mixture.TOKEN,
    )


# ------------------------------------------------------------------------------------- statistics


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, np.float64), q)) if xs else None


def ms_stats(xs_s: list[float]) -> dict[str, Any]:
    ms = [1e3 * x for x in xs_s]
    return {
        "n": len(ms),
        "p50": pct(ms, 50),
        "p99": pct(ms, 99),
        "max": max(ms) if ms else None,
        "mean": float(np.mean(ms)) if ms else None,
    }


def step_stats(steps: list[dict], prefills: list[dict], budget: int) -> dict[str, Any]:
    decode_only = [s for s in steps if s["prefill_tokens"] == 0 and s["rows"] > 0]
    full = [p for p in prefills if p["tokens"] >= FULL_CHUNK * budget]
    return {
        "steps": len(steps),
        "decode_only_step_ms": ms_stats([s["s"] for s in decode_only]),
        "decode_only_rows_median": pct([s["rows"] for s in decode_only], 50),
        "steps_with_prefill": len(steps) - len(decode_only),
        "prefill_passes": len(prefills),
        "prefill_tokens": sum(p["tokens"] for p in prefills),
        "full_chunk_ms": ms_stats([p["s"] for p in full]),
        "all_prefill_ms": ms_stats([p["s"] for p in prefills]),
    }


# ------------------------------------------------------------------------------------- scenarios


class Bench:
    def __init__(self, engine: Any, recorder: Any, args: argparse.Namespace, questions: list[str]):
        self.engine = engine
        self.rec = recorder
        self.args = args
        self.questions = questions[:STREAMS]
        self.seq_question = questions[STREAMS]
        self.cold_questions = questions[STREAMS + 1 :] or questions
        self.used: set[str] = set()  # passage ids any request has used
        self.next_row = 0  # where the search for unused passages goes on

    def cold_ids(self, k: int) -> list[str]:
        """k passages no request has used (so none is in the passage cache)."""
        index = self.engine.retrieval.retriever.index
        out: list[str] = []
        while len(out) < k:
            if self.next_row >= index.size:
                raise RuntimeError("the index has run out of unused passages; use fewer rounds.")
            pid = index.passage(self.next_row).id
            self.next_row += 1
            if pid not in self.used:
                out.append(pid)
        self.used.update(out)
        return out

    async def one(self, label: str, params: tuple[Any, Any, Any]) -> Stream:
        s = await run_stream(self.engine, Stream(label), *params)
        self.used.update(s.passage_ids)
        return s

    async def warm(self) -> None:
        """Every question once (fills the passage cache; compiles whatever compiles lazily)."""
        for q in [*self.questions, self.seq_question]:
            await self.one("warmup", token_params(q, 2))

    async def references(self) -> dict[str, Any]:
        """The RAG-Sequence request alone, then a RAG-Token request of its answer's length."""
        seq = await self.one("sequence-alone", sequence_params(self.seq_question, self.n))
        length = max(seq.generated, 1)
        tok = await self.one("token-alone", token_params(self.seq_question, length))
        return {
            "sequence_e2e_s": seq.e2e_s,
            "sequence_generated_tokens": seq.generated,
            "token_e2e_s": tok.e2e_s,
            "token_generated_tokens": tok.generated,
        }

    @property
    def n(self) -> int:
        return self.args.max_new_tokens

    async def scenario(self, kind: str) -> dict[str, Any]:
        stream_tokens = self.args.stream_tokens or 3 * self.n
        streams = [Stream(f"stream{i}") for i in range(STREAMS)]
        tasks = [
            asyncio.create_task(run_stream(self.engine, s, *token_params(q, stream_tokens)))
            for s, q in zip(streams, self.questions, strict=True)
        ]
        await asyncio.gather(*(s.first.wait() for s in streams))
        start = time.perf_counter()  # all four are streaming
        extra: dict[str, Any] = {}
        if kind == "alone":
            await asyncio.gather(*tasks)
            w0, w1 = start, min(s.tokens[-1] for s in streams)
        elif kind == "sequence":
            seq = await self.one("sequence", sequence_params(self.seq_question, self.n))
            w0, w1 = seq.submit, seq.end
            extra = {"sequence_e2e_s": seq.e2e_s, "sequence_generated_tokens": seq.generated}
        else:  # cold: each new request when the previous one got its first token
            cold: list[Stream] = []
            cold_tasks: list[asyncio.Task] = []
            while len(cold) < self.args.cold_requests and not any(t.done() for t in tasks):
                s = Stream(f"cold{len(cold)}")
                q = self.cold_questions[len(cold) % len(self.cold_questions)]
                params = cold_params(q, self.cold_ids(TOP_K), self.args.cold_new_tokens)
                cold_tasks.append(asyncio.create_task(run_stream(self.engine, s, *params)))
                cold.append(s)
                await s.first.wait()
            await asyncio.gather(*cold_tasks)  # raises a cold request's error, if any
            w0 = cold[0].submit
            w1 = max(x.tokens[0] if x.tokens else x.end for x in cold)
            extra = {
                "cold_requests": len(cold),
                "cold_ttft_ms": ms_stats([x.tokens[0] - x.submit for x in cold if x.tokens]),
            }
        await asyncio.gather(*tasks)
        streaming_end = min(s.tokens[-1] for s in streams)
        m1 = min(w1, streaming_end)  # the measured window: interferer in flight, all four streaming
        gaps = [g for s in streams for g in s.gaps(w0, m1)]
        steps, prefills = self.rec.between(w0, m1)
        return {
            "kind": kind,
            "window_s": m1 - w0,
            "interferer_s": w1 - w0,
            "covered": (m1 - w0) / (w1 - w0) if w1 > w0 else 1.0,
            "stream_tokens": [len(s.tokens) for s in streams],
            "gaps_s": gaps,
            "steps": step_stats(steps, prefills, self.args.max_prefill_tokens),
            **extra,
        }


async def run_all(args: argparse.Namespace, questions: list[str]) -> dict[str, Any]:
    from ragmix.config import ServerConfig
    from ragmix.engine.loader import load_engine

    recorder = _observer_class()()
    cfg = ServerConfig(max_prefill_tokens=args.max_prefill_tokens).validate()
    t = time.perf_counter()
    engine = load_engine(cfg, observer=recorder)
    engine.start()
    load_s = time.perf_counter() - t
    bench = Bench(engine, recorder, args, questions)
    try:
        await bench.warm()
        refs, rounds = [], []
        t_measure = time.perf_counter()
        for r in range(args.rounds):
            refs.append(await bench.references())
            for kind in ("alone", "sequence", "cold"):
                res = await bench.scenario(kind)
                rounds.append({"round": r, **res})
                s = res["steps"]
                print(
                    f"  round {r} {kind:8s}: window {res['window_s']:6.2f} s "
                    f"(covers {100 * res['covered']:.0f}% of the interferer), "
                    f"{len(res['gaps_s'])} gaps, p99 {ms_stats(res['gaps_s'])['p99'] or 0:.0f} ms, "
                    f"{s['prefill_passes']} prefill passes"
                )
        steps, prefills = recorder.between(t_measure, time.perf_counter())
    finally:
        engine.shutdown()
    return {
        "engine_load_s": load_s,
        "config": {
            "max_prefill_tokens": cfg.max_prefill_tokens,
            "max_batch_rows": cfg.max_batch_rows,
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "passage_cache_bytes": cfg.passage_cache_bytes,
        },
        "references": refs,
        "rounds": rounds,
        "run_steps": step_stats(steps, prefills, args.max_prefill_tokens),
    }


def summarize(raw: dict[str, Any], budget: int) -> dict[str, Any]:
    scen: dict[str, Any] = {}
    for kind in ("alone", "sequence", "cold"):
        rs = [r for r in raw["rounds"] if r["kind"] == kind]
        gaps = [g for r in rs for g in r["gaps_s"]]
        scen[kind] = {
            "itl_ms": ms_stats(gaps),
            "window_s": sum(r["window_s"] for r in rs),
            "covered_min": min(r["covered"] for r in rs),
            "decode_only_step_ms_p50": pct(
                [
                    r["steps"]["decode_only_step_ms"]["p50"]
                    for r in rs
                    if r["steps"]["decode_only_step_ms"]["p50"] is not None
                ],
                50,
            ),
            "decode_only_rows_median": pct(
                [
                    r["steps"]["decode_only_rows_median"]
                    for r in rs
                    if r["steps"]["decode_only_rows_median"] is not None
                ],
                50,
            ),
            "prefill_passes": sum(r["steps"]["prefill_passes"] for r in rs),
        }
    run = raw["run_steps"]
    chunk = run["full_chunk_ms"]
    allowance = chunk["p99"]
    alone_p99 = scen["alone"]["itl_ms"]["p99"]
    goals: dict[str, Any] = {
        "chunk_allowance_ms": allowance,
        "chunk_allowance_is": f"p99 of the run's full-chunk prefill passes (>= {FULL_CHUNK} x "
        f"{budget} computed tokens), n = {chunk['n']}",
    }
    for kind in ("sequence", "cold"):
        p99 = scen[kind]["itl_ms"]["p99"]
        rise = None if p99 is None or alone_p99 is None else p99 - alone_p99
        goals[kind] = {
            "p99_rise_ms": rise,
            "ok_vs_p99_chunk": None if rise is None or allowance is None else rise <= allowance,
            "ok_vs_max_chunk": None
            if rise is None or chunk["max"] is None
            else rise <= chunk["max"],
        }
    seq = [r["sequence_e2e_s"] for r in raw["references"]]
    tok = [r["token_e2e_s"] for r in raw["references"]]
    in_a = [r["sequence_e2e_s"] for r in raw["rounds"] if r["kind"] == "sequence"]
    ratio = float(np.median(seq) / np.median(tok))
    goals["sequence_e2e"] = {
        "sequence_alone_ms_median": 1e3 * float(np.median(seq)),
        "token_same_length_alone_ms_median": 1e3 * float(np.median(tok)),
        "ratio": ratio,
        "goal_ratio": 3.0,
        "ok": ratio <= 3.0,
        "sequence_beside_streams_ms_median": 1e3 * float(np.median(in_a)),
        "ratio_beside_streams": float(np.median(in_a) / np.median(tok)),
        "answer_tokens": [r["sequence_generated_tokens"] for r in raw["references"]],
    }
    return {
        "scenarios": scen,
        "chunk_ms": chunk,
        "decode_only_step_ms": run["decode_only_step_ms"],
        "goals": goals,
    }


def print_table(s: dict[str, Any], budget: int) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}"

    print(
        f"\n{'scenario':10s} {'gaps':>6s} {'p50':>6s} {'p99':>6s} {'max':>6s} "
        f"{'decode step':>12s} {'rows':>5s} {'prefills':>8s}   (ms)"
    )
    names = {"alone": "alone", "sequence": "(a) seq", "cold": "(b) cold"}
    for kind, name in names.items():
        x = s["scenarios"][kind]
        i = x["itl_ms"]
        print(
            f"{name:10s} {i['n']:6d} {f(i['p50']):>6s} {f(i['p99']):>6s} {f(i['max']):>6s} "
            f"{f(x['decode_only_step_ms_p50']):>12s} {f(x['decode_only_rows_median']):>5s} "
            f"{x['prefill_passes']:8d}"
        )
    c = s["chunk_ms"]
    d = s["decode_only_step_ms"]
    print(
        f"\nfull chunk (>= {FULL_CHUNK} x {budget} tokens): n {c['n']}, median {f(c['p50'])} ms, "
        f"p99 {f(c['p99'])} ms, max {f(c['max'])} ms; decode-only step median {f(d['p50'])} ms"
    )
    g = s["goals"]
    for kind in ("sequence", "cold"):
        x = g[kind]
        print(
            f"goal {names[kind]}: p99 rise {f(x['p99_rise_ms'])} ms <= chunk p99 "
            f"{f(g['chunk_allowance_ms'])} ms: {x['ok_vs_p99_chunk']} "
            f"(<= chunk max: {x['ok_vs_max_chunk']})"
        )
    e = g["sequence_e2e"]
    print(
        f"goal RAG-Sequence e2e alone {e['sequence_alone_ms_median']:.0f} ms vs RAG-Token of "
        f"the same length {e['token_same_length_alone_ms_median']:.0f} ms = {e['ratio']:.2f}x "
        f"(<= 3x: {e['ok']}); beside the streams {e['ratio_beside_streams']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="RAG-Sequence request's tokens (and the streams' unit)",
    )
    p.add_argument(
        "--stream-tokens",
        type=int,
        default=0,
        help="each of the 4 streams' tokens (0 = 3 x --max-new-tokens, so that they "
        "outlast the interferers)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="ServerConfig's chunk budget (default: the server's default)",
    )
    p.add_argument(
        "--questions",
        type=int,
        default=STREAMS + 2,
        help="built-in questions: 4 streams, 1 RAG-Sequence, the rest for (b)'s queries",
    )
    p.add_argument("--cold-requests", type=int, default=6, help="(b): cold requests per round")
    p.add_argument(
        "--cold-new-tokens",
        type=int,
        default=1,
        help="(b): tokens per cold request (1 = prefill only, no extra decode rows)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alone, (a), (b) this many times each")
    p.add_argument("--out", type=Path, default=RESULTS / "itl.json")
    args = p.parse_args(argv)
    if args.questions < STREAMS + 1:
        p.error(f"--questions must be >= {STREAMS + 1} (4 streams + the RAG-Sequence question)")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(HERE))
    from serving import machine_info, write_json

    from ragmix.bench.loadgen import BUILTIN_QUESTIONS
    from ragmix.config import ServerConfig

    if args.max_prefill_tokens is None:
        args.max_prefill_tokens = ServerConfig().max_prefill_tokens
    questions = list(BUILTIN_QUESTIONS[: args.questions])
    report: dict[str, Any] = {
        "machine": machine_info(),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "streams": STREAMS,
        "top_k": TOP_K,
        "num_beams": NUM_BEAMS,
    }
    t0 = time.perf_counter()
    print(
        f"ITL of {STREAMS} RAG-Token streams (K={TOP_K}), max_prefill_tokens "
        f"{args.max_prefill_tokens}, {args.rounds} rounds"
    )
    raw = asyncio.run(run_all(args, questions))
    report["summary"] = summarize(raw, args.max_prefill_tokens)
    for r in raw["rounds"]:
        r["itl_ms"] = ms_stats(r.pop("gaps_s"))
    report["raw"] = raw
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.perf_counter() - t0
    print_table(report["summary"], args.max_prefill_tokens)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
