"""Mixture-kernel benchmark: one greedy RAG-Token step for one request of K passage rows.

Compares, in one process and after warm-up, the fused Numba kernel (`ragmix.kernels`), the numpy
reference (`ragmix.kernels.reference`), and torch code written as Hugging Face's
`RagTokenForGeneration.marginalize` (log_softmax, + log prior, logsumexp over the passages, argmax),
with torch limited to one thread as numpy. Numba runs with its default thread choice (threads
only for big steps, see mixture.py) and with one. Reports medians of interleaved runs (the load of other processes falls on every contender alike).

    python benchmarks/kernels.py [--quick]

Writes benchmarks/results/kernels.json and kernels.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch

from ragmix import kernels
from ragmix.kernels import mixture, reference

RESULTS = Path(__file__).resolve().parent / "results"
KS = (1, 5, 10, 20)
VOCABS = (32000, 49152, 151936)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved_medians(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median ms of each function, run in turn each round, so that load from other processes on a
    shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (and JIT for Numba)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def numba_with_threads(threads: int | None, args: tuple):
    """The kernel with its thread cap set to `threads` (None: the default, size-based choice)."""

    def call():
        mixture.set_max_threads(threads)
        try:
            kernels.mixture_step(*args)
        finally:
            mixture.set_max_threads(None)

    return call


def torch_marginalize(logits: torch.Tensor, log_prior: torch.Tensor) -> int:
    seq_logprobs = torch.log_softmax(logits, dim=-1)  # k x vocab
    log_p_mix = torch.logsumexp(seq_logprobs + log_prior[:, None], dim=0)  # vocab
    return int(torch.argmax(log_p_mix))


def run(repeats: int, ks: tuple[int, ...], vocabs: tuple[int, ...], threads: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    print(
        " K      V  numba ms  1-thr ms  numpy ms  torch ms  numpy/nb  numpy/nb1  torch/nb  same",
        flush=True,
    )
    for vocab in vocabs:
        for k in ks:
            logits = (rng.standard_normal((k, vocab)) * 4).astype(np.float32)  # k x vocab
            scores = rng.standard_normal(k)
            log_prior = (scores - np.logaddexp.reduce(scores)).astype(np.float32)  # k
            args = (
                logits,
                log_prior,
                np.array([0, k], dtype=np.int64),
                np.zeros(1, dtype=np.float32),
                np.zeros(1, dtype=np.int32),
                np.ones(1, dtype=np.float32),
                np.zeros(1),
                0,
            )
            t_logits, t_prior = torch.from_numpy(logits), torch.from_numpy(log_prior)
            fused = kernels.mixture_step(*args).token[0]
            ref = reference.mixture_step(*args).token[0]
            hf = torch_marginalize(t_logits, t_prior)
            medians = interleaved_medians(
                {
                    "numba_ms": numba_with_threads(None, args),
                    "numba_1thread_ms": numba_with_threads(1, args),
                    "numpy_ms": lambda a=args: reference.mixture_step(*a),
                    "torch_ms": lambda a=t_logits, b=t_prior: torch_marginalize(a, b),
                },
                repeats,
            )
            row = {"K": k, "V": vocab, **medians, "same_token": bool(fused == ref == hf)}
            row["numba_threads"] = mixture.kernel_threads(k * vocab)
            row["numpy_over_numba"] = row["numpy_ms"] / row["numba_ms"]
            row["torch_over_numba"] = row["torch_ms"] / row["numba_ms"]
            row["numpy_over_numba_1thread"] = row["numpy_ms"] / row["numba_1thread_ms"]
            rows.append(row)
            print(
                f"{k:>2} {vocab:>6} {row['numba_ms']:9.3f} {row['numba_1thread_ms']:9.3f}"
                f" {row['numpy_ms']:9.3f} {row['torch_ms']:9.3f} {row['numpy_over_numba']:8.1f}x"
                f" {row['numpy_over_numba_1thread']:8.1f}x {row['torch_over_numba']:8.1f}x"
                f"  {row['same_token']}",
                flush=True,
            )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["V"] for r in rows})
    fig, axes = plt.subplots(1, len(vocabs), figsize=(4.2 * len(vocabs), 3.6), squeeze=False)
    for ax, vocab in zip(axes[0], vocabs, strict=True):
        sub = [r for r in rows if r["V"] == vocab]
        ks = [r["K"] for r in sub]
        for key, label in (
            ("numba_ms", "Numba (fused), default threads"),
            ("numba_1thread_ms", "Numba (fused), 1 thread"),
            ("numpy_ms", "numpy reference"),
            ("torch_ms", "torch, 1 thread (HF marginalize)"),
        ):
            ax.plot(ks, [r[key] for r in sub], marker="o", label=label)
        ax.set_title(f"V = {vocab}")
        ax.set_xlabel("K (passages)")
        ax.set_ylabel("ms per step (median)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("RAG-Token mixture step, one request, greedy")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, K in {1, 5, 20}")
    opts = parser.parse_args()
    threads = numba.get_num_threads()
    torch.set_num_threads(1)  # as numpy, whose elementwise and reduction ops use one thread
    kernels.warmup()
    repeats = 15 if opts.quick else 40
    ks = (1, 5, 20) if opts.quick else KS
    rows = run(repeats, ks, VOCABS, threads)
    result = {
        "benchmark": "one greedy RAG-Token mixture step, one request of K rows (median ms)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "numba_threads": threads,
            "torch_threads": 1,
            "load_average_at_start": os.getloadavg(),
            "numba_threading_layer": numba.threading_layer(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "torch": torch.__version__,
        },
        "repeats": repeats,
        "quick": opts.quick,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "kernels.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    plot(rows, RESULTS / "kernels.png")
    print(f"wrote {out} and {RESULTS / 'kernels.png'}")


if __name__ == "__main__":
    main()
