"""The decode step against its peers and the memory floor (issue 10), in one run, on the same
prompt token ids for every system:

    ragmix      the fused graph at each precision (fp32, q4, q4-a8), driven as the engine drives it
                (Generator.forward: IO binding, the KV written in place);
    ragmix-traced  the torch.onnx trace earlier releases served (fp32), with its own feeds;
    ort-genai   onnxruntime-genai's model builder output for the same model (fp32, int4), its
                graph run by onnxruntime with its own feeds (past and present apart, as it runs
                on CPU);
    llama.cpp   llama-cpp-python on the very GGUF (its batch API: rows = sequences);
    floor       the bytes a step must read (weights + the rows' KV) at the memory bandwidth
                measured in this process (onnxruntime ReduceSum over 512 MB, 2 threads).

Each system: 1-row decode, 5/20/80-row steps (every row with a 300-token past), 5 x 300 prefill;
ms as medians of --rounds x --iters, and the ratio to the floor. Then the engine end to end
(benchmarks/engine_tps.py): single-stream RAG-Token answer tokens/s with the new default bundle
against an earlier release's checkout (--baseline-rev, its own bundle) in the same run, and the
greedy agreement of q4-a8 with the exact q4 on the built-in questions.

Peers come from the `bench` extra (onnxruntime-genai, llama-cpp-python: it builds from source).

    python benchmarks/step.py                      # everything, ~15 min on 2 cores
    python benchmarks/step.py --skip engine        # the step table only

Results: benchmarks/results/step.json (+ step.png).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOG = logging.getLogger("step")
PAST = 300
ROWS = (1, 5, 20, 80)
THREADS = 2


def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def timed(fn, iters: int) -> list[float]:
    fn()  # warm: prepacking, arenas
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


# ------------------------------------------------------------------------------- systems


class RagmixFused:
    def __init__(self, folder: Path) -> None:
        from ragmix.models.generator import Generator

        self.gen = Generator.load(folder, threads=THREADS)
        self.cache = self.gen.new_cache(max(ROWS), PAST + 64)

    def prefill(self, ids: np.ndarray) -> None:
        n, s = ids.shape
        cache = [c[:n] for c in self.cache]
        self.gen.forward(ids, np.zeros(n, np.int64), np.full((n, 1), s - 1), cache)

    def step(self, rows: int, tokens: np.ndarray) -> None:
        lengths = np.full(rows, PAST, np.int64)
        self.gen.forward(
            tokens[:rows, None],
            lengths,
            np.zeros((rows, 1), np.int64),
            [c[:rows] for c in self.cache],
        )

    def nodes(self) -> int:
        return node_count(self.gen.folder / "model.onnx")


class OnnxFeeds:
    """A graph run with plain session.run and its own input names (ragmix-traced, ort-genai)."""

    def __init__(self, path: Path, layers: int, kv_heads: int, head_dim: int) -> None:
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(
            str(path), session_options(), providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.shape = (kv_heads, head_dim)
        self.layers = layers
        self.past = {r: np.zeros((r, kv_heads, PAST, head_dim), np.float32) for r in ROWS}

    def feeds(self, ids: np.ndarray, past: int) -> dict[str, np.ndarray]:
        n, s = ids.shape
        total = past + s
        f: dict[str, np.ndarray] = {}
        for name in self.inputs:
            if name == "input_ids":
                f[name] = ids
            elif name == "attention_mask":
                f[name] = np.ones((n, total), np.int64)
            elif name == "position_ids":
                f[name] = np.tile(np.arange(past, total, dtype=np.int64), (n, 1))
            elif name == "logits_index":
                f[name] = np.full((n, 1), s - 1, np.int64)
            elif name.startswith("past_key_values"):
                f[name] = (
                    self.past[n]
                    if past
                    else np.zeros((n, *self.shape[:1], 0, self.shape[1]), np.float32)
                )
            else:
                raise ValueError(f"{self.path}: unknown input {name}")
        return f

    def prefill(self, ids: np.ndarray) -> None:
        self.session.run(None, self.feeds(ids, 0))

    def step(self, rows: int, tokens: np.ndarray) -> None:
        self.session.run(None, self._step_feeds[rows])

    def prepare_steps(self, tokens: np.ndarray) -> None:
        self._step_feeds = {r: self.feeds(tokens[:r, None], PAST) for r in ROWS}

    def nodes(self) -> int:
        return node_count(self.path)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: one llama_decode per step, rows as
    sequences of one unified KV cache (a 300-token past copied to every sequence)."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx = max(ROWS) * (PAST + 8) + 2048
        cp.n_batch = 2048
        cp.n_ubatch = 512
        cp.n_seq_max = max(ROWS)
        cp.n_threads = cp.n_threads_batch = THREADS
        cp.kv_unified = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(2048, 0, max(ROWS))

    def _decode(
        self, tokens: list[int], positions: list[int], seqs: list[int], last: list[bool]
    ) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, out) in enumerate(zip(tokens, positions, seqs, last, strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, p, 1
            b.seq_id[i][0] = s
            b.logits[i] = out
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def prefill(self, ids: np.ndarray) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        toks, pos, seqs, last = [], [], [], []
        for s, row in enumerate(ids.tolist()):
            toks += row
            pos += list(range(len(row)))
            seqs += [s] * len(row)
            last += [False] * (len(row) - 1) + [True]
        for a in range(0, len(toks), 2048):
            self._decode(
                toks[a : a + 2048], pos[a : a + 2048], seqs[a : a + 2048], last[a : a + 2048]
            )

    def prepare_steps(self, ids: np.ndarray) -> None:
        self.prefill(ids[:1, :PAST])
        for s in range(1, max(ROWS)):
            self.lc.llama_memory_seq_cp(self.mem, 0, s, -1, -1)

    def step(self, rows: int, tokens: np.ndarray) -> None:
        self._decode(tokens[:rows].tolist(), [PAST] * rows, list(range(rows)), [True] * rows)
        for s in range(rows):
            self.lc.llama_memory_seq_rm(self.mem, s, PAST, -1)


# ------------------------------------------------------------------------------- floor


def bandwidth_gbs(rounds: int) -> float:
    """Read bandwidth with THREADS threads, as a decode step reads weights: onnxruntime's fp32
    GEMV (1 x 4096 times 4096 x 32768, 512 MB) through MLAS, bound by the bytes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 4096, 32768
    w = np.full((k, n), 1e-3, np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "bw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = ort.InferenceSession(
        model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    x = np.ones((1, k), np.float32)
    times = timed(lambda: s.run(None, {"x": x}), 10 * rounds)
    return w.nbytes / median(times) / 1e9


def weight_bytes(gguf: Path) -> tuple[int, int]:
    """(fp32 bytes of the weights, bytes of the GGUF's tensors as stored), the embedding once."""
    import gguf as g

    reader = g.GGUFReader(str(gguf))
    params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    return 4 * params, stored


# ------------------------------------------------------------------------------- preparation


def prepare(work: Path) -> dict[str, Path]:
    """Bundles and peer models under `work` (built once, reused)."""
    from ragmix.models.defaults import find_smollm2_gguf
    from ragmix.models.generator_export import export_generator

    folder, gguf = find_smollm2_gguf()
    out: dict[str, Path] = {"gguf": folder / gguf}
    for name, kw in {
        "ragmix fp32": {"precision": "fp32"},
        "ragmix q4": {"precision": "q4"},
        "ragmix q4-a8": {"precision": "q4-a8"},
        "ragmix-traced fp32": {"graph": "traced"},
    }.items():
        target = work / name.replace(" ", "-")
        if not (target / "manifest.json").is_file():
            LOG.info("exporting %s", name)
            export_generator(folder, target, gguf_file=gguf, overwrite=True, **kw)
        out[name] = target
    hf = work / "hf-smollm2"
    if not (hf / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a
        # plain one built from the same config.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(hf)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(hf)
    for precision in ("fp32", "int4"):
        target = work / f"genai-{precision}"
        if not (target / "model.onnx").is_file():
            LOG.info("onnxruntime-genai builder, %s", precision)
            subprocess.run(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                 str(target), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")],
                check=True,
            )  # fmt: skip
        out[f"ort-genai {precision}"] = target / "model.onnx"
    return out


def load_system(name: str, path: Path) -> Any:
    if name.startswith("ragmix "):
        return RagmixFused(path)
    if name.startswith("ragmix-traced"):
        return OnnxFeeds(path / "model.onnx", 30, 3, 64)
    if name.startswith("ort-genai"):
        return OnnxFeeds(path, 30, 3, 64)
    if name == "llama.cpp":
        return LlamaCpp(path)
    raise ValueError(name)


def measure(system: Any, ids: np.ndarray, rounds: int, iters: int) -> dict[str, float]:
    tokens = ids[:, -1].copy()  # max(ROWS) rows: each row's next token
    res: dict[str, float] = {}
    res["prefill_5x300_ms"] = 1e3 * median(
        [t for _ in range(rounds) for t in timed(lambda: system.prefill(ids[:5]), 1)]
    )
    if hasattr(system, "prepare_steps"):
        system.prepare_steps(ids if isinstance(system, LlamaCpp) else tokens)
    for rows in ROWS:
        n = max(3, iters // (1 + rows // 20))
        times = [t for _ in range(rounds) for t in timed(lambda r=rows: system.step(r, tokens), n)]
        res[f"step_{rows}_ms"] = 1e3 * median(times)
    return res


# ------------------------------------------------------------------------------- engine


def engine_runs(args: argparse.Namespace, bundles: dict[str, Path], work: Path) -> dict[str, Any]:
    """Single-stream RAG-Token tokens/s: the new default bundle vs --baseline-rev (its own tree
    and bundle, in a git worktree), alternately; and q4-a8's greedy agreement with q4."""
    base = work / f"baseline-{args.baseline_rev}"
    if not base.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline_rev],
            check=True,
        )
    script = HERE / "engine_tps.py"
    common = ["--questions", str(args.questions), "--max-new-tokens", str(args.max_new_tokens)]

    def run(pythonpath: Path, cache: Path, extra: list[str]) -> dict[str, Any]:
        env = {**os.environ, "PYTHONPATH": str(pythonpath), "RAGMIX_CACHE_DIR": str(cache)}
        out = subprocess.run(
            [sys.executable, str(script), *common, *extra],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout)

    cache_new = Path(os.environ.get("RAGMIX_CACHE_DIR", Path.home() / ".cache" / "ragmix"))
    results: dict[str, list[dict[str, Any]]] = {"new": [], "baseline": [], "q4": [], "q4-a8": []}
    for _ in range(args.rounds):
        results["baseline"].append(run(base / "server", work / "baseline-cache", []))
        results["new"].append(run(ROOT / "server", cache_new, []))
    results["q4"].append(
        run(ROOT / "server", cache_new, ["--generator", str(bundles["ragmix q4"])])
    )
    results["q4-a8"].append(
        run(ROOT / "server", cache_new, ["--generator", str(bundles["ragmix q4-a8"])])
    )
    same = total = 0
    for a, b in zip(results["q4"][0]["runs"], results["q4-a8"][0]["runs"], strict=True):
        diverged = False
        for i, t in enumerate(a["ids"]):
            diverged = diverged or i >= len(b["ids"]) or b["ids"][i] != t
            same += not diverged
            total += 1
    rate = {
        k: median([r["decode_tokens_per_s_median"] for r in v]) for k, v in results.items() if v
    }
    return {
        "decode_tokens_per_s": rate,
        "ratio_new_vs_baseline": rate["new"] / rate["baseline"],
        "q4_a8_greedy_identical_fraction": same / total if total else None,
        "raw": results,
    }


# ------------------------------------------------------------------------------- main


def plot(table: dict[str, dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = [f"step_{r}_ms" for r in ROWS] + ["prefill_5x300_ms"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = list(table)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(
            np.arange(len(cols)) + i * width,
            [table[name].get(c, np.nan) for c in cols],
            width,
            label=name,
        )
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, [c.replace("_ms", "") for c in cols])
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M, 2 cores: decode step (300-token past) and prefill")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ragmix" / "bench-step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="parts to skip: table (every system), a system by name prefix (llama.cpp, "
        "ort-genai, ragmix-traced), engine",
    )
    p.add_argument(
        "--baseline-rev", default="aadff7a", help="the release the engine is compared to"
    )
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "results" / "step.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    bundles = prepare(args.work)
    ids = np.random.default_rng(0).integers(100, 49000, (max(ROWS), PAST)).astype(np.int64)
    load_before = os.getloadavg()
    bw = bandwidth_gbs(args.rounds)
    fp32_bytes, stored_bytes = weight_bytes(bundles["gguf"])
    kv_row = 30 * 2 * 3 * PAST * 64 * 4  # fp32 KV of one row's past
    floor = {
        "fp32": {r: (fp32_bytes + r * kv_row) / bw / 1e6 for r in ROWS},
        "4-bit": {r: (stored_bytes + r * kv_row) / bw / 1e6 for r in ROWS},
    }
    print(f"bandwidth {bw:.1f} GB/s; floors (ms) fp32 {floor['fp32']}, 4-bit {floor['4-bit']}")
    table: dict[str, dict[str, float]] = {}
    nodes: dict[str, int] = {}
    names = [n for n in bundles if n != "gguf"] + ["llama.cpp"]
    for name in [] if "table" in args.skip else names:
        if any(name.startswith(s) for s in args.skip):
            continue
        system = load_system(name, bundles["gguf"] if name == "llama.cpp" else bundles[name])
        table[name] = measure(system, ids, args.rounds, args.iters)
        if hasattr(system, "nodes"):
            nodes[name] = system.nodes()
        print(name, {k: round(v, 2) for k, v in table[name].items()}, flush=True)
        del system
    for name, row in table.items():
        kind = "fp32" if "fp32" in name else "4-bit"
        for r in ROWS:
            row[f"step_{r}_x_floor"] = row[f"step_{r}_ms"] / floor[kind][r]
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": THREADS,
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "bandwidth_gbs": bw,
        "floor_ms": {k: {str(r): v for r, v in f.items()} for k, f in floor.items()},
        "graph_nodes": nodes,
        "table": table,
    }
    if "table" in args.skip and args.out.is_file():  # keep the table of an earlier run
        result = {**json.loads(args.out.read_text()), "engine_machine": result["machine"]}
    if "engine" not in args.skip:
        result["engine"] = engine_runs(args, bundles, args.work)
        print("engine", {k: v for k, v in result["engine"].items() if k != "raw"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    if table:
        plot(table, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
