"""SIGKILL during a stream of adds and deletes, several rounds: after each restart every
acknowledged add is found by id and by its own text, every acknowledged delete is gone, and the
index and the store agree on the count.

The kill lands while a change is in flight (sent, not yet answered): before its commit, after it,
or in a snapshot (every 5 changes). That change may or may not have happened; the test asks the
restarted server which, and the count must match the answer. Nothing here waits on the clock.
"""

from __future__ import annotations

import random
import shutil
import signal

import grpc
import pytest
from conftest import ServerProcess, start_server, stop_server
from servers import tiny_args

from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

TOKEN = "crash-admin"
META = (("authorization", f"Bearer {TOKEN}"),)
ROUNDS = 4
WORDS = [
    "river",
    "stone",
    "garden",
    "window",
    "yellow",
    "copper",
    "winter",
    "silver",
    "market",
    "pocket",
    "ladder",
    "engine",
    "harbor",
    "candle",
    "forest",
    "planet",
    "bridge",
    "marble",
    "orchard",
    "whistle",
    "velvet",
    "anchor",
    "meadow",
    "lantern",
    "thunder",
    "saddle",
    "canyon",
    "pebble",
    "falcon",
    "harvest",
    "glacier",
    "compass",
    "violin",
    "tunnel",
    "parcel",
    "blanket",
    "cactus",
    "dolphin",
    "feather",
    "goblet",
    "hammer",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "magnet",
    "nectar",
]


class Model:
    """What the index must hold: acknowledged changes, and the one in flight at the kill."""

    def __init__(self, built_ids: list[str]) -> None:
        self.live: dict[str, str | None] = dict.fromkeys(built_ids)  # id -> text (None: built)
        self.gone: set[str] = set()
        self.in_flight: tuple[str, list[pb.NewPassage] | list[str]] | None = None
        self.n = 0

    def new_passages(self, rng: random.Random, round_no: int) -> list[pb.NewPassage]:
        out = []
        for _ in range(rng.randint(1, 3)):
            self.n += 1
            text = " ".join(rng.sample(WORDS, 12))  # distinct word sets: distinct vectors
            out.append(pb.NewPassage(id=f"crash-{round_no}-{self.n}", title="crash", text=text))
        return out

    def applied(self, kind: str, what) -> None:
        if kind == "add":
            self.live.update({p.id: p.text for p in what})
        else:
            for i in what:
                if self.live.pop(i, "absent") != "absent":
                    self.gone.add(i)


def run_round(server: ServerProcess, model: Model, rng: random.Random, round_no: int) -> None:
    """Changes until a random number are acknowledged, then SIGKILL with the next in flight."""
    kill_after = rng.randint(3, 20)
    with grpc.insecure_channel(server.target) as ch:
        admin = pb_grpc.IndexAdminStub(ch)
        for n in range(kill_after + 1):
            if model.live and rng.random() < 0.35:
                kind, what = "delete", rng.sample(sorted(model.live), min(2, len(model.live)))
                call, request = admin.DeletePassages, pb.DeletePassagesRequest(ids=what)
            else:
                kind, what = "add", model.new_passages(rng, round_no)
                call, request = admin.AddPassages, pb.AddPassagesRequest(passages=what)
            if n < kill_after:
                call(request, metadata=META, timeout=120)
                model.applied(kind, what)
                continue
            pending = call.future(request, metadata=META, timeout=120)
            model.in_flight = (kind, what)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(60)
            try:
                pending.result()
            except grpc.RpcError:  # the connection died with the server: not acknowledged
                pass
            else:  # answered before the kill landed: acknowledged
                model.applied(kind, what)
                model.in_flight = None


def settle_in_flight(stub: pb_grpc.RagServiceStub, model: Model) -> None:
    """Ask the restarted server whether the change in flight at the kill happened."""
    if model.in_flight is None:
        return
    kind, what = model.in_flight
    ids = [p.id for p in what] if kind == "add" else list(what)
    present = [found(stub, i) for i in ids]
    assert len(set(present)) == 1, f"half of one change survived: {dict(zip(ids, present))}"
    if present[0] == (kind == "add"):
        model.applied(kind, what)
    model.in_flight = None


def found(stub: pb_grpc.RagServiceStub, pid: str) -> bool:
    request = pb.GenerateRequest(
        query="q", passage_ids=[pid], decoding=pb.DecodingParams(max_new_tokens=1)
    )
    try:
        events = list(stub.Generate(request, timeout=120))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        return False
    return events[0].passages.passages[0].id == pid


def check(server: ServerProcess, model: Model) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub, admin = pb_grpc.RagServiceStub(ch), pb_grpc.IndexAdminStub(ch)
        settle_in_flight(stub, model)
        stats = admin.IndexStats(pb.IndexStatsRequest(), metadata=META, timeout=60)
        assert stats.vectors == stats.built + stats.added
        assert stats.passages == stats.vectors - stats.deleted == len(model.live)
        for pid, text in model.live.items():
            if text is None:
                continue
            assert found(stub, pid), pid
            hits = stub.Retrieve(pb.RetrieveRequest(query=text, top_k=3), timeout=60).passages
            best = [h.id for h in hits if h.score >= hits[0].score - 1e-5]
            assert pid in best, (pid, [(h.id, h.score) for h in hits])
        for pid in model.gone:
            assert not found(stub, pid), pid
        everything = stub.Retrieve(pb.RetrieveRequest(query=WORDS[0], top_k=8), timeout=60)
        assert not {h.id for h in everything.passages} & model.gone


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_sigkill_during_changes_loses_no_acknowledged_change(
    index_type, tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path
):
    if index_type == "flat":
        index = shutil.copytree(tiny_index_dir, tmp_path / "index")
    else:
        from ragmix.index import build_index, default_corpus
        from ragmix.index.types import IndexSpec
        from ragmix.models.encoder import Encoder

        docs = [d for d in default_corpus() if d.title in ("yield", "class", "for", "while")]
        index = build_index(
            docs, Encoder.load(tiny_encoder_dir), tmp_path / "index", words_per_passage=40,
            progress=False, spec=IndexSpec("hnsw", hnsw_m=16, ef_construction=64),
        )  # fmt: skip
    (tmp_path / "admin").write_text(TOKEN + "\n")
    extra = ["--admin-token-file", str(tmp_path / "admin"), "--snapshot-changes", "5"]
    if index_type == "hnsw":
        extra += ["--ef-search", "256"]  # exhaustive on this size: every passage is reachable
    args = tiny_args(tiny_generator_dir, tiny_encoder_dir, index, *extra)
    rng = random.Random(f"crash-{index_type}")
    model = Model(built_ids_of(index))
    server = start_server(args, tmp_path / "server-0.log")
    try:
        for round_no in range(ROUNDS):
            run_round(server, model, rng, round_no)
            server = start_server(args, tmp_path / f"server-{round_no + 1}.log")
            check(server, model)
        assert stop_server(server) == 0  # a clean stop saves a snapshot: nothing to replay
        server = start_server(args, tmp_path / "server-last.log")
        check(server, model)
        assert "replayed" not in server.output()
    finally:
        stop_server(server)  # also when a check fails: no server outlives the test


def built_ids_of(index) -> list[str]:
    from ragmix.index import IndexBundle

    bundle = IndexBundle.load(index)
    ids = [bundle.passage(r).id for r in range(bundle.size)]
    bundle.close()
    return ids
