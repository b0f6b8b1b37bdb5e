"""IndexAdmin on a real server: the admin token guards it (also when serving auth is off), added
passages are retrieved by their own text and by id at once, deleted ones are gone, limits are
refused with the field named, and `ragmix index add/delete/stats` drive it with the SDK.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import pytest
from conftest import start_server, stop_server
from servers import free_port, scrape, tiny_args

from ragmix_client import IndexAdminClient, NewPassage, RagClient, RagmixError
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

ADMIN, SERVING = "admin-secret-1", "serving-secret-1"
NEW = [
    NewPassage("Walrus operator", "The walrus operator assigns inside an expression.", "walrus:0"),
    NewPassage("Match statement", "Structural pattern matching compares a subject to patterns."),
]


@pytest.fixture(scope="module")
def admin_server(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path_factory):
    """A server that accepts changes, on a private copy of the tiny index, with serving auth."""
    folder = tmp_path_factory.mktemp("admin")
    index = shutil.copytree(tiny_index_dir, folder / "index")
    (folder / "admin").write_text(f"# admins\n{ADMIN}\n")
    (folder / "serving").write_text(f"{SERVING}\n")
    args = tiny_args(
        tiny_generator_dir, tiny_encoder_dir, index,
        *("--admin-token-file", str(folder / "admin"), "--auth-token-file", str(folder / "serving")),
        *("--max-admin-batch", "4", "--max-passage-chars", "300"),
        *("--metrics-port", str(port := free_port())),
    )  # fmt: skip
    server = start_server(args, folder / "server.log")
    server.metrics_port = port
    yield server
    stop_server(server)


def admin_call(target: str, method: str, request, token: str | None):
    with grpc.insecure_channel(target) as ch:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return getattr(pb_grpc.IndexAdminStub(ch), method)(request, metadata=metadata, timeout=60)


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
        (SERVING, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_index_admin_needs_the_admin_token(admin_server, token, code):
    for method, request in (
        ("IndexStats", pb.IndexStatsRequest()),
        ("AddPassages", pb.AddPassagesRequest(passages=[NEW[0].to_pb()])),
        ("DeletePassages", pb.DeletePassagesRequest(ids=["yield:0"])),
    ):
        with pytest.raises(grpc.RpcError) as e:
            admin_call(admin_server.target, method, request, token)
        assert e.value.code() == code, (method, e.value)
        assert "token" in e.value.details()
    with IndexAdminClient(admin_server.target, token=ADMIN) as admin:
        assert admin.stats().added == 0  # nothing got through


def test_a_server_without_admin_tokens_refuses_index_admin(tiny_server):
    with pytest.raises(grpc.RpcError) as e:
        admin_call(tiny_server.target, "IndexStats", pb.IndexStatsRequest(), None)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--admin-token-file" in e.value.details()
    with RagClient(tiny_server.target) as client:  # serving stays open
        assert client.retrieve("yield", top_k=1)


def test_added_passages_are_retrieved_at_once_and_deleted_ones_are_gone(admin_server):
    with (
        IndexAdminClient(admin_server.target, token=ADMIN) as admin,
        RagClient(admin_server.target, token=SERVING) as client,
    ):
        before = admin.stats()
        assert before.writable and before.passages == before.built == client.info().passages
        metrics = scrape(admin_server.metrics_port)
        added = admin.add_passages(NEW)
        assert (
            added.ids[0] == "walrus:0" and added.ids[1] == f"match-statement@{before.vectors + 1}"
        )
        assert added.passages == before.passages + 2 == client.info().passages
        for p, pid in zip(NEW, added.ids, strict=True):
            top = client.retrieve(p.text, top_k=1)[0]  # its own text: inner product 1
            assert (top.id, top.text, top.title) == (pid, p.text, p.title)
        answer = client.generate_text(NEW[1].text, passage_ids=added.ids, max_new_tokens=2)
        assert [p.id for p in answer.passages] == added.ids

        result = admin.delete_passages([added.ids[0], "yield:0", "never:0"])
        assert result.deleted == [added.ids[0], "yield:0"] and result.not_found == ["never:0"]
        assert result.passages == before.passages
        for pid, text in ((added.ids[0], NEW[0].text), ("yield:0", None)):
            with pytest.raises(RagmixError) as e:
                client.generate_text("q", passage_ids=[pid], max_new_tokens=1)
            assert e.value.code == grpc.StatusCode.NOT_FOUND and pid in e.value.message
            if text:
                assert pid not in [p.id for p in client.retrieve(text, top_k=8)]
        again = admin.delete_passages([added.ids[0]])  # a retried delete succeeds
        assert again.deleted == [] and again.not_found == [added.ids[0]]
        stats = admin.stats()
        assert (stats.added, stats.deleted, stats.sequence) == (2, 2, 4)
        assert stats.vectors == stats.built + 2 and stats.passages == stats.vectors - 2
        after = scrape(admin_server.metrics_port)
        for kind in ("add", "delete"):
            key = f'ragmix_index_changes_total{{kind="{kind}"}}'
            assert after[key] - metrics.get(key, 0) == 2
        assert after["ragmix_index_passages"] == stats.passages


@pytest.mark.parametrize(
    ("passages", "field", "code"),
    [
        ([NewPassage("t", "x")] * 5, "passages", grpc.StatusCode.INVALID_ARGUMENT),
        ([NewPassage("t", "x" * 301)], "passages.text[0]", grpc.StatusCode.INVALID_ARGUMENT),
        ([NewPassage("t", "   ")], "passages.text[0]", grpc.StatusCode.INVALID_ARGUMENT),
        ([NewPassage("t", "a", "d:0"), NewPassage("t", "b", "d:0")], "'d:0'",
         grpc.StatusCode.INVALID_ARGUMENT),
        ([NewPassage("t", "a", " padded")], "passages.id[0]", grpc.StatusCode.INVALID_ARGUMENT),
        ([NewPassage("t", "a", "class:0")], "class:0", grpc.StatusCode.ALREADY_EXISTS),
    ],
)  # fmt: skip
def test_bad_changes_are_refused_naming_the_field_and_change_nothing(
    admin_server, passages, field, code
):
    with IndexAdminClient(admin_server.target, token=ADMIN) as admin:
        before = admin.stats()
        with pytest.raises(RagmixError) as e:
            admin.add_passages(passages)
        assert e.value.code == code and field in e.value.message, e.value
        assert admin.stats() == before
        with pytest.raises(RagmixError) as e:
            admin.delete_passages([])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "ids" in e.value.message


def test_the_cli_adds_deletes_and_reports(admin_server, tmp_path):
    doc = tmp_path / "notes.md"
    words = " ".join(f"w{i}" for i in range(150))  # 60-word passages: < 300 characters
    doc.write_text(f"# Release notes\n\n{words}. The end of the notes.\n")
    env_run = [sys.executable, "-m", "ragmix.cli", "index"]
    common = ["--target", admin_server.target, "--token", ADMIN]
    out = subprocess.run(
        [*env_run, "add", str(doc), *common, "--words", "60"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "added 3 passages" in out.stdout
    with RagClient(admin_server.target, token=SERVING) as client:
        ids = [p.id for p in client.retrieve(words[:200], top_k=3)]
        assert "release-notes:0" in ids
    out = subprocess.run(
        [*env_run, "delete", "release-notes:0", "release-notes:9", *common],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "deleted 1 passages" in out.stdout and "release-notes:9" in out.stdout
    out = subprocess.run(
        [*env_run, "stats", "--json", *common], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and '"writable": true' in out.stdout
    bad = subprocess.run(
        [*env_run, "stats", "--target", admin_server.target, "--token", SERVING],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1 and "PERMISSION_DENIED" in bad.stderr
