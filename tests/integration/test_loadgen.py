"""The load generator against a real `ragmix serve` subprocess on loopback (a few seconds of load)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragmix.bench.loadgen import (
    LoadSpec,
    build_report,
    percentiles,
    print_summary,
    read_questions,
    run_load,
)
from ragmix.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]
PCTS = ("p50", "p90", "p95", "p99", "max")


def run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


def assert_ordered(d: dict) -> None:
    values = [d[q] for q in PCTS]
    assert all(v is not None for v in values), d
    assert values == sorted(values), d
    assert values[0] >= 0


@pytest.fixture(scope="module")
def sweep(tiny_server, tmp_path_factory):
    """Closed loop, concurrency 1 then 2, ~1.5 s each, through benchmarks/loadgen.py."""
    out = tmp_path_factory.mktemp("loadgen")
    run(
        [
            sys.executable,
            "benchmarks/loadgen.py",
            "--target",
            tiny_server.target,
            "--concurrency",
            "1,2",
            "--duration",
            "1.5",
            "--warmup",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(out / "sweep.json"),
            "--plots",
            str(out / "plots"),
            "--raw",
        ]
    )
    return json.loads((out / "sweep.json").read_text()), out / "plots"


def test_sweep_report_has_every_figure_and_the_parameters(sweep, tiny_server):
    report, _ = sweep
    assert report["tool"] == "ragmix bench load"
    p = report["params"]
    assert (p["target"], p["mode"], p["concurrency"]) == (tiny_server.target, "closed", [1, 2])
    assert (p["duration_s"], p["warmup_requests"], p["max_new_tokens"]) == (1.5, 2, 8)
    assert report["server"]["generator"].startswith("tiny-llama")
    assert report["server"]["max_top_k"] == 8
    assert [r["label"] for r in report["runs"]] == ["c=1", "c=2"]
    for run_ in report["runs"]:
        s = run_["summary"]
        assert s["requests"] == s["ok"] > 0 and s["errors"] == 0 and s["errors_by_code"] == {}
        assert s["warmup_requests"] == 2
        assert s["tokens_per_s"] > 0 and s["requests_per_s"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert_ordered(s[key])
        assert s["ttft_ms"]["n"] == s["e2e_ms"]["n"] == s["ok"]


def test_sweep_figures_agree_with_the_raw_records(sweep):
    report, _ = sweep
    for run_ in report["runs"]:
        s, records = run_["summary"], run_["records"]
        measured = [r for r in records if not r["warmup"]]
        assert [r["index"] for r in records if r["warmup"]] == [0, 1]
        assert len(measured) == s["requests"]
        assert sum(r["generated_tokens"] for r in measured) == s["generated_tokens"]
        # Inter-token gaps: one fewer than the token events of each request, all non-negative.
        assert s["itl_ms"]["n"] == sum(len(r["itl_ms"]) for r in measured)
        assert all(x >= 0 for r in measured for x in r["itl_ms"])
        for r in measured:
            assert r["sent_s"] >= r["scheduled_s"]  # closed loop: scheduled when a slot frees
            assert 0 <= r["ttft_ms"] <= r["e2e_ms"]
            assert 1 <= len(r["itl_ms"]) + 1 <= r["generated_tokens"]
        assert max(r["e2e_ms"] for r in measured) == pytest.approx(s["e2e_ms"]["max"])


def test_sweep_writes_png_plots(sweep):
    _, plots = sweep
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["latency_cdf.png", "sweep_throughput.png", "sweep_ttft.png"]
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_open_loop_counts_latency_from_the_scheduled_time(tiny_server, tmp_path):
    out = tmp_path / "open.json"
    r = run(
        [
            sys.executable,
            "-m",
            "ragmix.cli",
            "bench",
            "load",
            "--target",
            tiny_server.target,
            "--rate",
            "4",
            "--duration",
            "1.5",
            "--warmup",
            "0.5s",
            "--max-new-tokens",
            "6",
            "--arrival-seed",
            "3",
            "--out",
            str(out),
            "--raw",
        ]
    )
    assert "latency (ms)" in r.stdout and "rate=4/s" in r.stdout
    report = json.loads(out.read_text())
    assert report["params"]["mode"] == "open" and report["params"]["rate"] == [4.0]
    (run_,) = report["runs"]
    s = run_["summary"]
    assert s["mode"] == "open" and s["rate_per_s"] == 4.0 and s["concurrency"] is None
    assert s["ok"] == s["requests"] > 0 and s["tokens_per_s"] > 0
    for key in ("ttft_ms", "itl_ms", "e2e_ms", "send_lag_ms"):
        assert_ordered(s[key])
    measured = [x for x in run_["records"] if not x["warmup"]]
    assert all(x["scheduled_s"] < 0.5 for x in run_["records"] if x["warmup"])
    for x in measured:
        assert x["scheduled_s"] >= 0.5 and x["sent_s"] >= x["scheduled_s"] - 1e-3
        # e2e runs from the scheduled arrival, not the actual send.
        assert x["e2e_ms"] == pytest.approx(1e3 * (x["end_s"] - x["scheduled_s"]))
    arrivals = [x["scheduled_s"] for x in run_["records"]]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == len(arrivals)


def test_rejected_requests_are_counted_by_status_code(tiny_server):
    # The server's max_top_k is 8: every request is refused, and the run still completes.
    spec = LoadSpec(tiny_server.target, concurrency=(2,), requests=5, top_k=9)
    info, results = asyncio.run(run_load(spec, progress=False))
    report = build_report(spec, info, results)
    s = report["runs"][0]["summary"]
    assert s["requests"] == 5 and s["ok"] == 0
    assert s["errors_by_code"] == {"INVALID_ARGUMENT": 5}
    assert s["tokens_per_s"] == 0 and s["ttft_ms"]["n"] == 0 and s["ttft_ms"]["p50"] is None
    assert all("top_k" in r.error for r in results[0].records)
    print_summary(report)  # renders the empty percentiles


def test_unreachable_target_fails_with_an_actionable_error():
    from ragmix.errors import UnavailableError

    spec = LoadSpec("127.0.0.1:9", requests=1, connect_timeout_s=0.5)
    with pytest.raises(UnavailableError, match=r"cannot reach 127\.0\.0\.1:9"):
        asyncio.run(run_load(spec, progress=False))


def test_questions_file_text_and_jsonl(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("What is yield?\n\n  How do classes work?  \n")
    assert read_questions(txt) == ("What is yield?", "How do classes work?")
    jl = tmp_path / "q.jsonl"
    jl.write_text('{"question": "a?"}\n{"query": "b?", "id": 2}\n')
    assert read_questions(jl) == ("a?", "b?")
    jl.write_text('{"text": "no question field"}\n')
    with pytest.raises(ValidationError, match="question"):
        read_questions(jl)


def test_spec_rejects_out_of_range_values():
    with pytest.raises(ValidationError, match="concurrency"):
        LoadSpec("127.0.0.1:1", concurrency=(0,))
    with pytest.raises(ValidationError, match="rate"):
        LoadSpec("127.0.0.1:1", rate=(-1.0,))
    with pytest.raises(ValidationError, match="target"):
        LoadSpec("localhost")


def test_percentiles_are_ordered_and_in_milliseconds():
    d = percentiles([0.010, 0.001, 0.005, 0.002, 0.100])
    assert [d[q] for q in PCTS] == sorted(d[q] for q in PCTS)
    assert d["max"] == pytest.approx(100.0) and d["n"] == 5
