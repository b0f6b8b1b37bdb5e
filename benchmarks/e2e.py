"""End to end (issue 6): the same questions through

    (a) ragmix over gRPC (a `ragmix serve` subprocess on loopback),
    (b) the RAG-Token loop written with Hugging Face transformers in PyTorch (benchmarks/hf_loop.py:
        same weights, same passages, same prompt token ids, K rows in a DynamicCache, HF's
        marginalize per step),
    (c) ragmix's engine in this process, without gRPC (the server's overhead is (c) vs (a)),

one question at a time and interleaved per question, so a shared machine's load falls on all three
alike. Prints tokens/s, time to first token and the ratios, and checks that the three greedy
answers are the same token ids (where they differ: the first differing position and the top-2 gap
of the mixture there).

The passage prefix cache is off by default (--passage-cache-bytes 0) so that (a), (c) and (b) all
prefill every passage; benchmarks/serving.py measures the cache.

    python benchmarks/e2e.py                       # 20 questions, 32 tokens
    python benchmarks/e2e.py --questions 6 --max-new-tokens 24

Results: benchmarks/results/e2e.json (+ e2e.png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger(__name__)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over questions, and tokens/s over the whole run (tokens / time incl. prefill)."""
    from serving import median

    tokens = sum(r["n_tokens"] for r in runs)
    total = sum(r["total_s"] for r in runs)
    return {
        "ttft_ms_median": 1e3 * median([r["ttft_s"] for r in runs]),
        "decode_tokens_per_s_median": median(
            [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
        ),
        "tokens": tokens,
        "total_s": total,
        "tokens_per_s": tokens / total,
    }


def plot(summary: dict[str, dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in (
        (axes[0], "tokens_per_s", "generated tokens/s (incl. prefill)"),
        (axes[1], "ttft_ms_median", "median time to first token (ms)"),
    ):
        ax.bar(names, [summary[n][key] for n in names], color=["C0", "C1", "C2"])
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--questions", type=int, default=20, help="built-in questions to ask")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5, help="passages (rows) per question")
    p.add_argument("--passage-cache-bytes", type=int, default=0, help="ragmix's cache, (a) and (c)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for (b)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "e2e.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(HERE))

    import hf_loop
    from serving import (
        Server,
        engine_ask,
        first_difference,
        grpc_ask,
        grpc_stub,
        hf_run,
        load_engine,
        machine_info,
        write_json,
    )

    from ragmix.bench.loadgen import BUILTIN_QUESTIONS

    questions = list(BUILTIN_QUESTIONS[: args.questions])
    k, m = args.top_k, args.max_new_tokens
    report: dict[str, Any] = {
        "machine": machine_info(),
        "params": {k_: str(v) if isinstance(v, Path) else v for k_, v in vars(args).items()},
    }
    t_start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"grpc": [], "hf": [], "engine": []}
    checks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(["--passage-cache-bytes", str(args.passage_cache_bytes)], Path(tmp) / "log")
        engine = None
        try:
            channel, stub, pb = grpc_stub(server.target)
            engine = load_engine(args.passage_cache_bytes)
            model = hf_loop.load_model(args.threads)
            for q in questions:
                a = grpc_ask(stub, pb, q, k, m)
                c = asyncio.run(engine_ask(engine, q, k, m))
                b, cmp_bc = hf_run(model, engine, c, m)
                retrieval_s = c["server_timings_ms"]["retrieval"] / 1e3
                runs["grpc"].append(
                    {
                        "question": q,
                        "ttft_s": a["ttft_s"],
                        "decode_tokens_per_s": a["decode_tokens_per_s"],
                        "total_s": a["total_s"],
                        "n_tokens": len(a["tokens"]),
                        "text": a.get("text"),
                    }
                )
                runs["engine"].append(
                    {
                        "question": q,
                        "ttft_s": c["ttft_s"],
                        "decode_tokens_per_s": c["decode_tokens_per_s"],
                        "total_s": c["total_s"],
                        "n_tokens": len(c["tokens"]),
                        "text": c.get("text"),
                    }
                )
                runs["hf"].append(
                    {
                        "question": q,
                        # HF has no retriever: the engine's retrieval time is added so TTFTs compare.
                        "ttft_s": b.prefill_s + retrieval_s,
                        "prefill_s": b.prefill_s,
                        "decode_tokens_per_s": b.decode_tokens_per_s,
                        "total_s": b.prefill_s + sum(b.step_s) + retrieval_s,
                        "n_tokens": len(b.tokens),
                        "text": engine.generator.decode(b.tokens),
                    }
                )
                check = {
                    "question": q,
                    "same_passages_a_c": a.get("passage_ids") == c.get("passage_ids"),
                    "same_answer_a_c": a["tokens"] == c["tokens"],
                    "first_difference_a_c": first_difference(a["tokens"], c["tokens"]),
                    "same_answer_b_c": cmp_bc.pop("same_answer"),
                    **{f"{key}_b_c": v for key, v in cmp_bc.items()},
                }
                checks.append(check)
                print(
                    f"  ttft a {1e3 * a['ttft_s']:6.0f} b {1e3 * b.prefill_s:6.0f} c "
                    f"{1e3 * c['ttft_s']:6.0f} ms | tok/s a {a['decode_tokens_per_s'] or 0:5.1f} "
                    f"b {b.decode_tokens_per_s or 0:5.1f} c {c['decode_tokens_per_s'] or 0:5.1f} | "
                    f"same a=c {check['same_answer_a_c']} b=c {check['same_answer_b_c']} | {q}"
                )
            channel.close()
        finally:
            if engine is not None:
                engine.shutdown()
            server.stop()

    summary = {
        "ragmix_grpc": summarize(runs["grpc"]),
        "hf_pytorch": summarize(runs["hf"]),
        "ragmix_engine": summarize(runs["engine"]),
    }
    g, h, e = summary["ragmix_grpc"], summary["hf_pytorch"], summary["ragmix_engine"]
    ratios = {
        "tokens_per_s_grpc_over_hf": g["tokens_per_s"] / h["tokens_per_s"],
        "tokens_per_s_engine_over_hf": e["tokens_per_s"] / h["tokens_per_s"],
        "tokens_per_s_engine_over_grpc": e["tokens_per_s"] / g["tokens_per_s"],
        "decode_grpc_over_hf": g["decode_tokens_per_s_median"] / h["decode_tokens_per_s_median"],
        "decode_engine_over_hf": e["decode_tokens_per_s_median"] / h["decode_tokens_per_s_median"],
        "ttft_hf_over_grpc": h["ttft_ms_median"] / g["ttft_ms_median"],
        "ttft_grpc_over_engine": g["ttft_ms_median"] / e["ttft_ms_median"],
    }
    agree = {
        "questions": len(checks),
        "same_answer_grpc_vs_engine": sum(c["same_answer_a_c"] for c in checks),
        "same_answer_hf_vs_engine": sum(c["same_answer_b_c"] for c in checks),
        "same_passages_grpc_vs_engine": sum(c["same_passages_a_c"] for c in checks),
    }
    report.update(
        summary=summary,
        ratios=ratios,
        agreement=agree,
        checks=checks,
        runs=runs,
        elapsed_s=time.perf_counter() - t_start,
    )

    print(f"\n{'':16s} {'tokens/s':>9s} {'decode tok/s':>13s} {'TTFT p50 ms':>12s}")
    for name, s in summary.items():
        print(
            f"{name:16s} {s['tokens_per_s']:9.2f} {s['decode_tokens_per_s_median']:13.2f} "
            f"{s['ttft_ms_median']:12.0f}"
        )
    for name, v in ratios.items():
        print(f"{name:32s} {v:6.2f}x")
    print(
        f"same greedy answers: gRPC = engine {agree['same_answer_grpc_vs_engine']}/{len(checks)}, "
        f"HF = engine {agree['same_answer_hf_vs_engine']}/{len(checks)}"
    )
    for c in checks:
        if not (c["same_answer_a_c"] and c["same_answer_b_c"]):
            print(f"  differs: {c}")
    write_json(args.out, report)
    if not args.no_plot and plot(summary, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
