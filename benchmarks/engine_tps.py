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
    return {
        "decode_tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "tokens_per_s": sum(len(r["ids"]) for r in runs) / sum(r["total_s"] for r in runs),
        "runs": runs,
    }


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
