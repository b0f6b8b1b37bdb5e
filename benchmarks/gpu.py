"""The GPU path's figures, each beside its CPU baseline measured in the same run, as one table.

    python benchmarks/gpu.py [--quick] [--out benchmarks/results/gpu.json]

Rows: decode step time at 1/5/20/80/320 rows (default generator, 256 slots of past per row);
the RAG-Token mixture kernel per step at K = 5 and 20 (CUDA kernel on device logits vs the Numba
CPU kernel); TTFT cold (passage prefix cache miss) and warm; tokens/s of RAG-Token answers at
1/16/64 concurrent streams through the in-process engine; FAISS flat QPS over 1M vectors; and the
device-to-host copies of step buffers (logits, KV) counted while the streams ran. Each part that
cannot run here (no CUDA provider, no FAISS GPU build) is reported with why, and the rest still
runs. benchmarks/gpu_check.sh calls it after the GPU tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS = (1, 5, 20, 80, 320)
STREAMS = (1, 16, 64)
PAST = 256  # slots of past per row in the decode-step timing
GOALS = {"single_stream_tps": 300.0, "tps_64_streams": 8000.0, "kernel_share_pct": 2.0}


def median_s(fn: Callable[[], Any], iters: int, sync: Callable[[], None]) -> float:
    """Median wall time of `fn` over `iters` runs after two warm-up runs, the device synced."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cuda_sync() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


def no_sync() -> None:
    return None


def load_generators(folder: Path) -> dict[str, Any]:
    from ragmix.models import device as dev
    from ragmix.models.generator import Generator

    gens = {"cpu": Generator.load(folder, providers=dev.Device("cpu").providers())}
    gpu = Generator.load(folder, providers=dev.Device("cuda", 0).providers())
    dev.Device("cuda", 0).check_placed(gpu.session, "generator")
    gens["cuda"] = gpu
    return gens


def decode_step_ms(gen: Any, rows: int, iters: int, sync: Callable[[], None]) -> float:
    """One decode pass (1 new token per row over PAST slots each), on the generator's device."""
    cache = gen.device_cache(rows, PAST + 1)
    ids = np.full((rows, 1), gen.pad_token_id, np.int64)
    lengths = np.full(rows, PAST, np.int64)
    index = np.zeros((rows, 1), np.int64)
    return 1e3 * median_s(lambda: gen.forward(ids, lengths, index, cache), iters, sync)


def decode_steps(gens: dict[str, Any], quick: bool) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {"cuda": {}, "cpu": {}}
    for rows in ROWS:
        out["cuda"][rows] = decode_step_ms(gens["cuda"], rows, 10 if quick else 30, cuda_sync)
        if rows <= (20 if quick else 80):  # the CPU baseline: slow at hundreds of rows
            out["cpu"][rows] = decode_step_ms(gens["cpu"], rows, 3 if quick else 5, no_sync)
    return out


def kernel_us(vocab: int, k: int, iters: int) -> dict[str, float]:
    """The mixture step over one request of K rows: CUDA on device logits vs Numba on the host."""
    import cupy

    from ragmix.kernels import mixture, mixture_cuda

    rng = np.random.default_rng(k)
    logits = (4 * rng.standard_normal((k, vocab))).astype(np.float32)
    args = (
        np.log(np.full(k, 1.0 / k, np.float32)),
        np.array([0, k], np.int64),
        np.zeros(1, np.float32),
        np.zeros(1, np.int32),
        np.ones(1, np.float32),
        np.zeros(1, np.float64),
        5,
    )
    device_logits = cupy.asarray(logits)
    gpu = median_s(lambda: mixture_cuda.mixture_step(device_logits, *args), iters, cuda_sync)
    cpu = median_s(lambda: mixture.mixture_step(logits, *args), iters, no_sync)
    return {"cuda_us": 1e6 * gpu, "cpu_us": 1e6 * cpu}


def engine_config(device: str, **kw: Any) -> Any:
    from ragmix.config import ServerConfig

    settings = {
        "device": device,
        "max_concurrent_requests": 64,
        "max_queued_requests": 128,
        "max_batch_rows": 320,
        "max_batch_tokens": 1 << 18,
        "max_prefill_tokens": 2048 if device != "cpu" else 128,
    }
    settings.update(kw)
    return ServerConfig(**settings).validate()


async def answer(engine: Any, question: str, n: int) -> dict[str, float]:
    from ragmix.engine.outputs import TokenEvent
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    params = DecodingParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0)
    t0 = time.perf_counter()
    stamps = []
    async for ev in engine.generate(RetrievalParams(question, top_k=5), params, Mixture.TOKEN):
        if isinstance(ev, TokenEvent):
            stamps.append(time.perf_counter())
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {
        "ttft_s": stamps[0] - t0,
        "tokens": len(stamps),
        "decode_tps": (len(stamps) - 1) / decode,
    }


async def engine_figures(device: str, quick: bool) -> dict[str, Any]:
    """TTFT cold/warm and tokens/s at 1/16/64 streams, host copies counted over the streams."""
    from ragmix.bench.loadgen import BUILTIN_QUESTIONS
    from ragmix.engine.loader import load_engine
    from ragmix.models import arrays

    engine = load_engine(engine_config(device))
    engine.start()
    n = 32 if quick else 64
    try:
        await answer(engine, "warm up the kernels and the graphs", 4)
        cold = await answer(engine, BUILTIN_QUESTIONS[0], 8)
        warm = await answer(engine, BUILTIN_QUESTIONS[0], 8)  # its passages are cached now
        out: dict[str, Any] = {"ttft_cold_ms": 1e3 * cold["ttft_s"]}
        out["ttft_warm_ms"] = 1e3 * warm["ttft_s"]
        copies = arrays.host_copies()
        for streams in STREAMS if device != "cpu" else STREAMS[:2]:
            questions = [BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)] for i in range(streams)]
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(answer(engine, q, n) for q in questions))
            wall = time.perf_counter() - t0
            out[f"tps_{streams}"] = sum(r["tokens"] for r in runs) / wall
            if streams == 1:
                out["single_stream_decode_tps"] = runs[0]["decode_tps"]
        out["host_copies"] = arrays.host_copies() - copies
        return out
    finally:
        engine.shutdown()


def faiss_qps(n: int, quick: bool) -> dict[str, float]:
    """Flat inner-product search, 5 results per query, batches of 256 and single queries."""
    import faiss

    from ragmix.index.gpu import GpuFlat, gpus
    from ragmix.index.tombstones import Tombstones

    if gpus() == 0:
        raise RuntimeError("this FAISS build has no GPU support (faiss-cpu installed)")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 384), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(n, 256, replace=False)]
    index = faiss.IndexFlatIP(384)
    index.add(vectors)
    gpu = GpuFlat(index, 0)
    masked = Tombstones(None).masked
    out = {}
    for batch in (256, 1):
        q = queries[:batch]
        t_gpu = median_s(lambda q=q: gpu.search(q, 5, masked, 0), 5 if quick else 20, no_sync)
        t_cpu = median_s(lambda q=q: index.search(q, 5), 2 if quick else 5, no_sync)
        out[f"gpu_qps_batch{batch}"] = batch / t_gpu
        out[f"cpu_qps_batch{batch}"] = batch / t_cpu
    return out


def run_part(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one part; a failure is reported (with why) instead of ending the run."""
    t = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # each part reports its own failure
        report.setdefault("could_not_run", {})[name] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    print(f"[gpu.py] {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def fmt(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def ratio(a: Any, b: Any) -> str:
    return "-" if not a or not b else f"{a / b:.1f}x"


def table(r: dict[str, Any]) -> str:
    lines = ["| figure | CUDA | CPU baseline | ratio |", "|---|---|---|---|"]
    steps = r.get("decode_step_ms", {})
    for rows in ROWS:
        gpu, cpu = steps.get("cuda", {}).get(rows), steps.get("cpu", {}).get(rows)
        lines.append(f"| decode step, {rows} rows (ms) | {fmt(gpu, 2)} | {fmt(cpu, 2)} | "
                     f"{ratio(cpu, gpu)} |")  # fmt: skip
    for k in (5, 20):
        kern = r.get(f"kernel_k{k}", {})
        lines.append(f"| mixture kernel, K = {k}, V = {r.get('vocab')} (µs) | "
                     f"{fmt(kern.get('cuda_us'))} | {fmt(kern.get('cpu_us'))} | "
                     f"{ratio(kern.get('cpu_us'), kern.get('cuda_us'))} |")  # fmt: skip
    gpu_e, cpu_e = r.get("engine_cuda", {}), r.get("engine_cpu", {})
    for key, label in (("ttft_cold_ms", "TTFT cold (ms)"), ("ttft_warm_ms", "TTFT warm (ms)")):
        lines.append(f"| {label} | {fmt(gpu_e.get(key))} | {fmt(cpu_e.get(key))} | "
                     f"{ratio(cpu_e.get(key), gpu_e.get(key))} |")  # fmt: skip
    for s in STREAMS:
        g, c = gpu_e.get(f"tps_{s}"), cpu_e.get(f"tps_{s}")
        lines.append(f"| tokens/s, {s} streams | {fmt(g)} | {fmt(c)} | {ratio(g, c)} |")
    q = r.get("faiss_flat_1m", {})
    for b in (256, 1):
        g, c = q.get(f"gpu_qps_batch{b}"), q.get(f"cpu_qps_batch{b}")
        lines.append(f"| FAISS flat 1M QPS, batch {b} | {fmt(g, 0)} | {fmt(c, 0)} | "
                     f"{ratio(g, c)} |")  # fmt: skip
    lines.append(f"| host copies of logits/KV during decode | {gpu_e.get('host_copies', '-')} "
                 "| - | - |")  # fmt: skip
    return "\n".join(lines)


def goals(r: dict[str, Any]) -> list[str]:
    e = r.get("engine_cuda", {})
    single, many = e.get("single_stream_decode_tps"), e.get("tps_64")
    kern = r.get("kernel_k5", {}).get("cuda_us")
    step = r.get("decode_step_ms", {}).get("cuda", {}).get(5)
    share = 100 * kern / (1e3 * step) if kern and step else None
    checks = [
        ("single-stream RAG-Token (K = 5) tokens/s", single, ">=", GOALS["single_stream_tps"]),
        ("aggregate tokens/s at 64 streams", many, ">=", GOALS["tps_64_streams"]),
        ("mixture kernel share of a 5-row step (%)", share, "<", GOALS["kernel_share_pct"]),
        ("host copies of logits/KV in the step", e.get("host_copies"), "==", 0),
    ]
    out = []
    for label, got, op, goal in checks:
        met = None if got is None else (got >= goal if op == ">=" else got < goal if op == "<"
                                        else got == goal)  # fmt: skip
        verdict = "not measured" if met is None else "met" if met else "NOT met"
        out.append(f"- {label}: {fmt(got) if got is not None else '-'} (goal {op} {goal}): "
                   f"{verdict}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    p.add_argument("--faiss-vectors", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    args = p.parse_args(argv)
    from ragmix import paths
    from ragmix.models import defaults

    report: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), load {os.getloadavg()}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    folder, _ = defaults.ensure_default_models(paths.cache_dir())
    gens: dict[str, Any] = {}
    run_part(report, "generators", lambda: gens.update(load_generators(folder)) or
             {k: g.providers for k, g in gens.items()})  # fmt: skip
    if "cuda" in gens:
        report["vocab"] = gens["cuda"].vocab_size
        run_part(report, "decode_step_ms", lambda: decode_steps(gens, args.quick))
        for k in (5, 20):
            run_part(
                report,
                f"kernel_k{k}",
                lambda k=k: kernel_us(gens["cuda"].vocab_size, k, 20 if args.quick else 200),
            )
    gens.clear()  # the engines load their own
    run_part(report, "engine_cuda", lambda: asyncio.run(engine_figures("cuda", args.quick)))
    run_part(report, "engine_cpu", lambda: asyncio.run(engine_figures("cpu", True)))
    run_part(report, "faiss_flat_1m", lambda: faiss_qps(args.faiss_vectors, args.quick))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(args.out)
    print(table(report))
    print("\nGoals on an H200:")
    print("\n".join(goals(report)))
    for name, why in report.get("could_not_run", {}).items():
        print(f"could not run {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
