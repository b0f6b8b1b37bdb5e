"""Shared fixtures: tiny real bundles (random weights, real tokenizers, real ONNX, real FAISS) and a
real server subprocess on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The CUDA kernel's tests need numba's CUDA target: the simulator (NUMBA_ENABLE_CUDASIM=1, set
# before numba is imported: scripts/test.sh runs them in a second pytest) or a device.
if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and os.environ.get("RAGMIX_CUDA_TESTS") != "1":
    collect_ignore = ["cuda"]
TINY_TOPICS = ("yield", "return", "for", "while", "if", "import", "class", "function", "try")


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import tiny_generator_bundle

    return tiny_generator_bundle(tmp_path_factory.mktemp("generator"), "llama")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_encoder import tiny_encoder_bundle

    return tiny_encoder_bundle(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="session")
def tiny_index_dir(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real FAISS index over a few Python reference topics, embedded by the tiny encoder."""
    from ragmix.index import build_index, default_corpus
    from ragmix.models.encoder import Encoder

    docs = [d for d in default_corpus() if d.title in TINY_TOPICS]
    assert len(docs) >= 5
    out = tmp_path_factory.mktemp("index") / "tiny"
    # 40-word passages keep the tiny tokenizer's prompts (~250 tokens) well inside the context.
    return build_index(
        docs, Encoder.load(tiny_encoder_dir), out, words_per_passage=40, progress=False
    )


@pytest.fixture(scope="session")
def tiny_parts(tiny_generator_dir: Path, tiny_encoder_dir: Path, tiny_index_dir: Path):
    """(Generator, Encoder, IndexBundle) loaded from the tiny bundles, one thread each."""
    from ragmix.index import IndexBundle
    from ragmix.models.encoder import Encoder
    from ragmix.models.generator import Generator

    gen = Generator.load(tiny_generator_dir, threads=1)
    enc = Encoder.load(tiny_encoder_dir, threads=1)
    return gen, enc, IndexBundle.load(tiny_index_dir, encoder_fingerprint=enc.fingerprint)


def row_logits(gen, ids, index):
    """Logits (len(index) x V) of one whole row computed from an empty cache: the plain
    recomputation engine results are held to."""
    import numpy as np

    ids = np.array([list(ids)], np.int64)
    cache = gen.new_cache(1, ids.shape[1])
    return gen.forward(ids, np.zeros(1, np.int64), np.array([list(index)], np.int64), cache)[0]


def make_engine(parts, observer=None, step_gate=None, **config):
    """A started in-process Engine over `parts` with test limits; the caller shuts it down."""
    from ragmix.engine.engine import Engine, EngineConfig
    from ragmix.engine.params import Limits
    from ragmix.engine.retrieval import RetrievalBatcher, Retriever

    gen, enc, idx = parts
    limits = Limits(max_top_k=8, default_top_k=3, max_new_tokens=64, default_max_new_tokens=16)
    engine = Engine(
        gen,
        RetrievalBatcher(Retriever(enc, idx), observer=observer),
        EngineConfig(limits=limits, **config),
        observer,
        step_gate,
    )
    engine.start()
    return engine


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def start_server(args: list[str], log: Path, timeout: float = 300.0) -> ServerProcess:
    """Run `ragmix serve --port 0 ARGS` and wait for its 'serving on' line."""
    f = open(log, "w")  # noqa: SIM115 - the process writes to it for its whole life
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragmix.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=f,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return ServerProcess(proc, wait_serving(proc, log, timeout), log)


def wait_serving(
    proc: subprocess.Popen, log: Path, timeout: float = 300.0, banner: str = "ragmix serving on"
) -> str:
    """The address a starting server logs in its `banner` line (its start-up is bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(re.escape(banner) + r" ([\d.]+):(\d+)", log.read_text(errors="replace"))
        if m:
            return f"{m[1]}:{m[2]}"
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{log.read_text()}")


def stop_server(server: ServerProcess, timeout: float = 60.0) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def tiny_server(
    tiny_generator_dir: Path,
    tiny_encoder_dir: Path,
    tiny_index_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """A real `ragmix serve` subprocess on loopback over the tiny bundles."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(
        [
            "--generator",
            str(tiny_generator_dir),
            "--encoder",
            str(tiny_encoder_dir),
            "--index",
            str(tiny_index_dir),
            "--max-top-k",
            "8",
            "--default-top-k",
            "4",
            "--max-new-tokens",
            "48",
            "--default-max-new-tokens",
            "12",
            "--max-batch-rows",
            "32",
            "--threads",
            "1",
        ],
        log,
    )
    yield server
    stop_server(server)
