"""Helpers for tests that drive a real `ragmix serve` subprocess: flags for the tiny bundles, a
/metrics scraper, and a server whose steps a test can hold (tests/gated_server.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import ServerProcess, wait_serving
from prometheus_client.parser import text_string_to_metric_families

QUESTION = "What does the yield statement do?"
ACTIVE_ROWS = "ragmix_active_rows"
GATED_SERVER = Path(__file__).parent / "gated_server.py"


def tiny_args(generator: Path, encoder: Path, index: Path, *extra: str) -> list[str]:
    """`ragmix serve` flags for the tiny bundles, plus `extra`."""
    return [
        *("--generator", str(generator), "--encoder", str(encoder), "--index", str(index)),
        *("--max-top-k", "8", "--default-top-k", "4", "--max-batch-rows", "32"),
        *("--default-max-new-tokens", "12", "--threads", "1"),
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics, keyed 'name{label="value",...}' with labels sorted."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def requests_key(rpc: str, code: str) -> str:
    return f'ragmix_requests_total{{code="{code}",rpc="{rpc}"}}'


def wait_metrics(
    port: int, ok: Callable[[dict[str, float]], bool], timeout: float = 30
) -> dict[str, float]:
    """Scrape until `ok` holds (the engine thread updates gauges after its step)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            m = scrape(port)
        except ConnectionError:  # a busy server may drop one poll; the next one counts
            m = {}
        if (m and ok(m)) or time.monotonic() > deadline:
            return m or scrape(port)
        time.sleep(0.1)


class GatedServer(ServerProcess):
    """A server whose engine pauses once a stream has streamed `hold_after` tokens."""

    gate: Path

    def hold_after(self, tokens: int) -> None:
        """From now on the engine pauses once a stream has `tokens` tokens."""
        write_gate(self.gate, str(tokens))

    def release(self) -> None:
        write_gate(self.gate, "release")


def write_gate(gate: Path, text: str) -> None:
    """Replace the gate file whole: the engine polls it and must never read it half-written."""
    tmp = gate.with_name(gate.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(gate)


def serve_gated(args: list[str], folder: Path, hold_after: int | None = 1) -> GatedServer:
    """`ragmix serve ARGS` on a free loopback port with a step gate (None = released)."""
    gate, log = folder / "gate", folder / "server.log"
    write_gate(gate, "release" if hold_after is None else str(hold_after))
    cmd = [sys.executable, str(GATED_SERVER), str(gate), "--host", "127.0.0.1", "--port", "0"]
    f = open(log, "w")  # noqa: SIM115 - the process writes to it for its whole life
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    server = GatedServer(proc, wait_serving(proc, log), log)
    server.gate = gate
    return server
