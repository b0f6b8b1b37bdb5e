"""The Node.js example client (examples/node) streams Generate from a live server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ragmix_client import RagClient

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
QUESTION = "What does the yield statement do?"


@pytest.fixture(scope="module")
def node_client() -> Path:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: the Node.js example cannot run here")
    modules = NODE_DIR / "node_modules"
    if not all((modules / "@grpc" / pkg).is_dir() for pkg in ("grpc-js", "proto-loader")):
        # Once per checkout: later runs reuse examples/node/node_modules (git-ignored).
        r = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, f"npm install failed:\n{r.stdout}\n{r.stderr}"
    return NODE_DIR / "client.js"


def _node(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(script), *args], capture_output=True, text=True, timeout=120)


def test_node_client_streams_the_same_answer_as_the_python_sdk(node_client, tiny_server):
    r = _node(node_client, tiny_server.target, QUESTION, "--top-k", "2", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    with RagClient(tiny_server.target, timeout=120) as c:
        a = c.generate_text(QUESTION, top_k=2, max_new_tokens=8)
    assert r.stdout.startswith(a.text + "\n\n"), r.stdout  # greedy: identical tokens
    for p, q in zip(a.passages, a.posterior):
        assert f"{p.id.ljust(24)} prior {p.prior:.3f} posterior {q:.3f}" in r.stdout
    d = a.done
    assert (
        f"[FINISH_REASON_{d.finish_reason.upper()}, {d.usage.generated_tokens} tokens]" in r.stdout
    )


def test_node_client_reports_the_servers_error(node_client, tiny_server):
    r = _node(node_client, tiny_server.target, QUESTION, "--top-k", "50")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT: top_k must be in [1, 8], got 50." in r.stderr
