"""Single-stream RAG-Token answer tokens/s of the engine in this process (K = 5, greedy, the
built-in questions one at a time, passage prefix cache off), as JSON on stdout.

Written against the engine's public API only (load_engine / generate), so benchmarks/step.py can
run it on this tree and on an earlier release's checkout (PYTHONPATH) in the same run, and
compare the greedy token ids of two generator bundles (--generator).

    python benchmarks/engine_tps.py --questions 8 --max-new-tokens 32 [--generator DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def ask(engine, question: str, n: int) -> dict:
    from ragmix.engine.outputs import TokenEvent
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    retrieval = RetrievalParams(question, top_k=5)
    decoding = DecodingParams(max_new_tokens=n, temperature=0.0)
    t0 = time.perf_counter()
    times, ids = [], []
    async for ev in engine.generate(retrieval, decoding, Mixture.TOKEN):
        if isinstance(ev, TokenEvent):
            times.append(time.perf_counter())
            ids.append(ev.id)
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "question": question,
        "ids": ids,
        "ttft_s": times[0] - t0 if times else None,
        "total_s": time.perf_counter() - t0,
        "decode_tokens_per_s": (len(times) - 1) / decode_s if decode_s else None,
    }


async def run(args: argparse.Namespace) -> dict:
    from ragmix.bench.loadgen import BUILTIN_QUESTIONS
    from ragmix.config import ServerConfig
    from ragmix.engine.loader import load_engine

    cfg = ServerConfig(passage_cache_bytes=0, generator=args.generator).validate()
    kernel_s, step_s = _time_kernel_and_steps()
    engine = load_engine(cfg)
    engine.start()
    try:
        await ask(engine, "warm up", 4)
        runs = [
            await ask(engine, q, args.max_new_tokens) for q in BUILTIN_QUESTIONS[: args.questions]
        ]
    finally:
        engine.shutdown()
    rates = sorted(r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"])
    kernel_s.sort()
    step_s.sort()
    return {
        "mixture_kernel_ms_median": 1e3 * kernel_s[len(kernel_s) // 2] if kernel_s else None,
        "engine_step_ms_median": 1e3 * step_s[len(step_s) // 2] if step_s else None,
        "decode_tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "tokens_per_s": sum(len(r["ids"]) for r in runs) / sum(r["total_s"] for r in runs),
        "runs": runs,
    }


def _time_kernel_and_steps() -> tuple[list[float], list[float]]:
    """Wall time of every mixture kernel call and every engine step, as the engine thread sees
    them (the kernel called right after an onnxruntime pass, not alone)."""
    from ragmix.engine import core

    kernel_s: list[float] = []
    step_s: list[float] = []
    mixture_step = core.kernels.mixture_step
    step = core.EngineCore.step

    def timed_kernel(*a, **kw):
        t = time.perf_counter()
        out = mixture_step(*a, **kw)
        kernel_s.append(time.perf_counter() - t)
        return out

    def timed_step(self):
        t = time.perf_counter()
        step(self)
        if self.running:
            step_s.append(time.perf_counter() - t)

    core.kernels.mixture_step = timed_kernel
    core.EngineCore.step = timed_step
    return kernel_s, step_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--generator", default=None, help="generator bundle (default: the embedded one)")
    args = p.parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
