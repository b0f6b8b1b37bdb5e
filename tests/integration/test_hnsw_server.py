"""An HNSW index built by `ragmix index build --index-type hnsw` and served: GetInfo names its
type, per-request ef_search works through gRPC and the SDK, a knob it lacks is refused, and a
server flag the index lacks stops the server at start."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import start_server, stop_server
from servers import QUESTION, tiny_args

from ragmix.index import IndexBundle
from ragmix.index.types import MAX_EF_SEARCH
from ragmix.models.encoder import Encoder
from ragmix_client import RagClient, RagmixError
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def hnsw_index(tiny_encoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hnsw") / "index"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ragmix.cli", "index", "build", "--encoder"),
            *(str(tiny_encoder_dir), "--out", str(out), "--words", "40"),
            *("--index-type", "hnsw", "--hnsw-m", "16", "--ef-construction", "64"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def server(tiny_generator_dir, tiny_encoder_dir, hnsw_index, tmp_path_factory):
    log = tmp_path_factory.mktemp("hnsw-server") / "server.log"
    srv = start_server(
        tiny_args(tiny_generator_dir, tiny_encoder_dir, hnsw_index, "--ef-search", "32"), log
    )
    yield srv
    stop_server(srv)


def exact_top(index_dir, encoder_dir, k: int) -> np.ndarray:
    """The true top-k inner products over every stored vector (what flat search returns); scores,
    not ids, so that a near-tie ordered differently by rounding cannot fail the comparison."""
    index = IndexBundle.load(index_dir)
    q = Encoder.load(encoder_dir, threads=1).encode([QUESTION])[0]
    return np.sort(index.vectors(np.arange(index.size)) @ q)[::-1][:k]


def test_an_hnsw_index_is_served_with_its_knobs(server, hnsw_index, tiny_encoder_dir):
    # HNSW's graph depends on its build threads' timing, so only an exhaustive search (efSearch
    # above the passage count: the candidate list never fills) has one right answer.
    exhaustive = MAX_EF_SEARCH
    exact = exact_top(hnsw_index, tiny_encoder_dir, 8)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.RagServiceStub(ch)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).index_type == "hnsw"
        default = stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=8), timeout=60)
        assert len(default.passages) == 8
        wide = stub.Retrieve(
            pb.RetrieveRequest(query=QUESTION, top_k=8, ef_search=exhaustive), timeout=60
        )
        np.testing.assert_allclose([p.score for p in wide.passages], exact, atol=1e-5)
        assert all(-1 <= p.score <= 1 for p in wide.passages)
        with pytest.raises(grpc.RpcError) as err:
            stub.Retrieve(pb.RetrieveRequest(query=QUESTION, top_k=8, nprobe=4), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("nprobe applies to ivfpq indexes")
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Generate(pb.GenerateRequest(query=QUESTION, top_k=8, ef_search=4), timeout=60)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ef_search must be in [top_k = 8" in err.value.details()
    with RagClient(server.target) as client:
        assert client.info().index_type == "hnsw"
        found = client.retrieve(QUESTION, top_k=8, ef_search=exhaustive)
        np.testing.assert_allclose([p.score for p in found], exact, atol=1e-5)
        with pytest.raises(RagmixError, match="nprobe"):
            client.retrieve(QUESTION, nprobe=2)


def test_a_knob_the_index_lacks_stops_the_server_at_start(
    tiny_generator_dir, tiny_encoder_dir, tiny_index_dir
):
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ragmix.cli", "serve", "--host", "127.0.0.1", "--port", "0"),
            *tiny_args(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, "--nprobe", "8"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "nprobe applies to ivfpq indexes; this server's index is flat" in done.stderr
