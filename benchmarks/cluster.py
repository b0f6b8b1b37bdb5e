"""Scale-out on Ray Serve against one engine, in one run (not CI; needs the `cluster` extra).

Every engine here runs its onnxruntime sessions on one thread (`--threads 1`) and Ray gives each
replica one CPU, so on a 2-core machine "2 replicas" means one core each and "1 replica" one core:
a fair comparison of adding a machine's worth of engine. Measured with the load generator (closed
loop, the same questions, greedy, default models):

a) `ragmix serve --threads 1` at 1 stream: the single-node baseline for the Ray path's overhead;
b) `ragmix cluster serve --replicas 1` at 1, 2, 4, 8 streams;
c) `ragmix cluster serve --replicas 2` at 2, 4, 8 streams.

Goals (issue 13): 2 replicas >= 1.8x the tokens/s of 1 replica at 8 streams; the Ray path adds
<= 10 ms to TTFT p50 and <= 2 ms to ITL p50 at 1 stream.

    python benchmarks/cluster.py                       # ~12 min on 2 cores
    python benchmarks/cluster.py --duration 8 --levels 2,8

Results: benchmarks/results/cluster.json (temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serving import RESULTS, Server, free_port, machine_info, write_json

from ragmix.bench.loadgen import LoadSpec, run_load

ENGINE_FLAGS = ["--threads", "1"]


class Cluster:
    """`ragmix cluster serve` in a subprocess; ready at its 'cluster serving on' line."""

    def __init__(self, replicas: int, log: Path, timeout: float = 900.0) -> None:
        self.log = log
        self._f = open(log, "w")  # noqa: SIM115 - the cluster writes to it for its whole life
        port = free_port()
        cmd = [
            sys.executable, "-m", "ragmix.cli", "cluster", "serve",
            *("--replicas", str(replicas), "--replica-cpus", "1", "--ray-num-cpus", "2"),
            *("--grpc-port", str(port), "--http-port", str(free_port())),
            *ENGINE_FLAGS,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(
                r"ragmix cluster serving on ([\d.]+):(\d+)", log.read_text("utf-8", "replace")
            )
            if m:
                self.target = f"{m[1]}:{m[2]}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}; log: {log}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"cluster did not start in {timeout:g} s; log: {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()


def measure(target: str, levels: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = LoadSpec(
        target=target,
        concurrency=tuple(levels),
        duration_s=args.duration,
        warmup_s=args.warmup,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        timeout_s=120.0,
    )
    _, results = asyncio.run(run_load(spec, progress=False))
    out = []
    for res in results:
        s = res.summary()
        out.append(
            {
                "streams": s["concurrency"],
                "requests": s["ok"],
                "errors": s["errors_by_code"],
                "tokens_per_s": round(s["tokens_per_s"], 2),
                "ttft_ms": s["ttft_ms"],
                "itl_ms": s["itl_ms"],
                "load_average": list(os.getloadavg()),
            }
        )
        print(
            f"  {s['concurrency']:>2} streams: {s['tokens_per_s']:7.1f} tokens/s, TTFT p50 "
            f"{s['ttft_ms']['p50']:.0f} ms, ITL p50 {s['itl_ms']['p50']:.1f} ms", flush=True,
        )  # fmt: skip
    return out


def at(rows: list[dict[str, Any]], streams: int) -> dict[str, Any]:
    return next(r for r in rows if r["streams"] == streams)


def goals(single: dict[str, Any], one: list[dict[str, Any]], two: list[dict[str, Any]]) -> dict:
    top = max(r["streams"] for r in two)
    speedup = at(two, top)["tokens_per_s"] / at(one, top)["tokens_per_s"]
    ray1 = at(one, 1)
    ttft = ray1["ttft_ms"]["p50"] - single["ttft_ms"]["p50"]
    itl = ray1["itl_ms"]["p50"] - single["itl_ms"]["p50"]
    return {
        f"two_replicas_over_one_at_{top}_streams": {
            "ratio": round(speedup, 3), "goal": ">= 1.8", "met": speedup >= 1.8,
        },
        "ray_ttft_p50_added_ms": {"value": round(ttft, 2), "goal": "<= 10", "met": ttft <= 10},
        "ray_itl_p50_added_ms": {"value": round(itl, 3), "goal": "<= 2", "met": itl <= 2},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=45.0, help="measured seconds per level")
    ap.add_argument(
        "--warmup", type=float, default=15.0, help="unmeasured seconds per level (warms the cache)"
    )
    ap.add_argument("--levels", default="2,4,8", help="streams for the replica comparison")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster.json")
    args = ap.parse_args(argv)
    # One thread per engine everywhere, the mixture kernel's (Numba) and BLAS's too, so that one
    # replica is one core's worth of engine; Ray's workers inherit this environment.
    os.environ.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    levels = sorted({int(x) for x in args.levels.split(",")})
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": vars(args) | {"out": str(args.out)},
    }
    logs = Path(tempfile.mkdtemp(prefix="ragmix-cluster-bench-"))

    print("single node, 1 stream", flush=True)
    server = Server(ENGINE_FLAGS, logs / "single.log")
    try:
        report["single_node"] = measure(server.target, [1], args)[0]
    finally:
        server.stop()
    for replicas, lv in ((1, [1, *levels]), (2, levels)):
        print(f"Ray Serve, {replicas} replica(s)", flush=True)
        cluster = Cluster(replicas, logs / f"cluster-{replicas}.log")
        try:
            report[f"ray_{replicas}_replicas"] = measure(cluster.target, lv, args)
        finally:
            cluster.stop()
    report["goals"] = goals(
        report["single_node"], report["ray_1_replicas"], report["ray_2_replicas"]
    )
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    write_json(args.out, {k: (str(v) if isinstance(v, Path) else v) for k, v in report.items()})
    for name, g in report["goals"].items():
        print(f"{name}: {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
