"""Broken bundles are refused at start, and killed builds never break the bundle they replace.

Every broken bundle is served with `ragmix serve`: the process must exit 2 before it listens, with
a message that names the file and the command that fixes it. Every build is killed with SIGKILL,
at random instants and on each filesystem step in turn (tests/reliability/killed_at.py): the
target then loads as the old bundle or the new one, complete, and the next build removes what the
killed one left.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_encoder import tiny_encoder_bundle

from ragmix.errors import BundleError
from ragmix.index import IndexBundle
from ragmix.models import bundle
from ragmix.models.generator import Generator

KILLED_AT = Path(__file__).parent / "killed_at.py"
SERVE_TIMEOUT_S = 300


def refused_at_start(generator: Path, encoder: Path, index: Path) -> str:
    """`ragmix serve` over the bundles must exit 2 without listening; its stderr."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "ragmix.cli", "serve", "--host", "127.0.0.1", "--port", "0"),
            *("--generator", str(generator), "--encoder", str(encoder), "--index", str(index)),
            *("--threads", "1", "--max-top-k", "8", "--max-batch-rows", "32"),
        ],
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "serving on" not in output and "Traceback" not in output, output[-2000:]
    return proc.stderr


def copy(folder: Path, to: Path) -> tuple[Path, Path]:
    """A copy of the bundle and the folder of its version in force."""
    out = shutil.copytree(folder, to)
    return out, bundle.resolve(out, "any")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(version: Path, **fields: object) -> None:
    path = version / bundle.MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


GENERATOR_DAMAGE = {
    "missing file": (lambda v: (v / "tokenizer.json").unlink(), "tokenizer.json"),
    "truncated file": (
        lambda v: (v / "model.onnx").write_bytes((v / "model.onnx").read_bytes()[:1000]),
        "model.onnx",
    ),
    "flipped byte": (lambda v: flip_byte(v / "model.onnx"), "model.onnx"),
    "manifest not JSON": (lambda v: (v / "manifest.json").write_text("{'kind': "), "manifest"),
    "manifest not an object": (lambda v: (v / "manifest.json").write_text("[]"), "manifest"),
    "malformed files table": (lambda v: edit_manifest(v, files={"x": 1}), "manifest"),
    "older format": (lambda v: edit_manifest(v, format=0), "format 0"),
    "a key the loader reads is missing": (lambda v: edit_manifest(v, kv=None), "manifest"),
}


INDEX_DAMAGE = {
    "missing file": (lambda v: (v / "passages.sqlite").unlink(), "passages.sqlite"),
    "truncated file": (
        lambda v: (v / "index.faiss").write_bytes((v / "index.faiss").read_bytes()[:100]),
        "index.faiss",
    ),
    "flipped byte": (lambda v: flip_byte(v / "passages.sqlite"), "passages.sqlite"),
    "manifest not JSON": (lambda v: (v / "manifest.json").write_bytes(b"\xff\xfe"), "manifest"),
    "older format": (lambda v: edit_manifest(v, format=0), "format 0"),
    "passage count disagrees": (lambda v: edit_manifest(v, passages=1), "passages"),
}


ENCODER_DAMAGE = {"missing file": (lambda v: (v / "model.onnx").unlink(), "model.onnx")}
DAMAGE = {"generator": GENERATOR_DAMAGE, "encoder": ENCODER_DAMAGE, "index": INDEX_DAMAGE}
FIX = {
    "generator": "ragmix models export",
    "encoder": "ragmix models export",
    "index": "ragmix index build",
}


@pytest.mark.parametrize(
    ("kind", "damage"), [(kind, damage) for kind, table in DAMAGE.items() for damage in table]
)
def test_a_broken_bundle_is_refused_at_start(
    kind, damage, tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path
):
    dirs = {"generator": tiny_generator_dir, "encoder": tiny_encoder_dir, "index": tiny_index_dir}
    dirs[kind], version = copy(dirs[kind], tmp_path / kind)
    spoil, names = DAMAGE[kind][damage]
    spoil(version)
    message = refused_at_start(dirs["generator"], dirs["encoder"], dirs["index"])
    assert names in message, message
    assert FIX[kind] in message, message  # the fix


def test_an_index_built_by_another_encoder_is_refused_at_start(
    tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path
):
    other = tiny_encoder_bundle(tmp_path / "other", seed=1)
    message = refused_at_start(tiny_generator_dir, other, tiny_index_dir)
    assert "was built with encoder" in message and "ragmix index build" in message, message


def test_damaged_pointer_and_interrupted_first_build_are_refused(
    tiny_generator_dir, tiny_encoder_dir, tiny_index_dir, tmp_path
):
    broken, _ = copy(tiny_generator_dir, tmp_path / "generator")
    (broken / bundle.POINTER).write_text("v-20990101T000000-abcdef\n")
    message = refused_at_start(broken, tiny_encoder_dir, tiny_index_dir)
    assert "names version v-20990101T000000-abcdef" in message, message
    interrupted = tmp_path / "index"
    (interrupted / ".v-20990101T000000-abcdef.partial").mkdir(parents=True)
    (interrupted / ".lock").touch()
    message = refused_at_start(tiny_generator_dir, tiny_encoder_dir, interrupted)
    assert "a build into it was interrupted" in message and "ragmix index build" in message


# ----------------------------------------------------------------------------- crash safety


def ragmix(*args: str, kill: tuple[str, int] = ("replace", 0)) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(KILLED_AT), kill[0], str(kill[1]), *args],
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT_S,
    )


def assert_only_the_version_in_force(target: Path) -> None:
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted([bundle.LOCK, bundle.POINTER, bundle.resolve(target, "any").name])
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
    assert not leftovers, leftovers


def killed_builds(command: list[str], load, sizes: set[int], runs_s: float) -> dict[str, int]:
    """Kill `command` on every filesystem step, then at random instants; after each kill the
    target loads as one of `sizes`. Returns how many kills landed where."""
    landed: dict[str, int] = {}
    for function, ks in (("replace", range(1, 50)), ("fsync", (1, 2, 4)), ("rmtree", (1, 2))):
        for k in ks:
            done = ragmix(*command, kill=(function, k))
            if done.returncode == 0:  # fewer than k calls: the build ran to its end
                break
            assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
            assert load() in sizes
            landed[function] = k
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(KILLED_AT), "replace", "0", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, runs_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert load() in sizes
        landed["random"] = landed.get("random", 0) + 1
    return landed


def test_a_killed_index_build_leaves_the_previous_index_intact(tiny_encoder_dir, tmp_path):
    target = tmp_path / "index"
    small = tmp_path / "small.txt"
    small.write_text("A generator function yields values one at a time. " * 30)
    first = ragmix(
        "index", "build", str(small), "--encoder", str(tiny_encoder_dir), "--out", str(target)
    )
    assert first.returncode == 0, first.stderr[-2000:]
    old = IndexBundle.load(target).size
    rebuild = [
        "index",
        "build",
        "--encoder",
        str(tiny_encoder_dir),
        "--out",
        str(target),
        "--overwrite",
    ]
    t0 = time.perf_counter()
    assert ragmix(*rebuild).returncode == 0  # the default corpus: many more passages
    runs_s = time.perf_counter() - t0
    new = IndexBundle.load(target).size
    assert new > old
    assert_only_the_version_in_force(target)
    landed = killed_builds(rebuild, lambda: IndexBundle.load(target).size, {new}, runs_s)
    # Back to the small one, killed midway through: never half of either.
    back = [
        "index",
        "build",
        str(small),
        "--encoder",
        str(tiny_encoder_dir),
        "--out",
        str(target),
        "--overwrite",
    ]
    more = killed_builds(back, lambda: IndexBundle.load(target).size, {old, new}, runs_s)
    print(f"index build killed at {landed} and {more}")
    assert landed["replace"] >= 3 and landed["fsync"] >= 2 and landed["rmtree"] >= 1
    assert ragmix(*back).returncode == 0
    assert IndexBundle.load(target).size == old
    assert_only_the_version_in_force(target)  # the killed builds' leftovers are gone


def test_a_killed_model_export_leaves_the_previous_bundle_intact(tiny_generator_dir, tmp_path):
    source = tiny_generator_dir.parent / "hf-llama"
    target = tmp_path / "generator"
    export = ["models", "export", "--from-hf", str(source), "--out", str(target)]
    assert ragmix(*export).returncode == 0
    fp32 = Generator.load(target).manifest["precision"]
    overwrite = [*export, "--overwrite", "--quantize", "int4"]
    t0 = time.perf_counter()
    assert ragmix(*overwrite).returncode == 0
    runs_s = time.perf_counter() - t0
    q4 = Generator.load(target).manifest["precision"]
    assert (fp32, q4) == ("fp32", "q4")
    back = [*export, "--overwrite"]
    landed = killed_builds(
        back, lambda: Generator.load(target).manifest["precision"], {fp32, q4}, runs_s
    )
    print(f"models export killed at {landed}")
    assert ragmix(*back).returncode == 0
    assert Generator.load(target).manifest["precision"] == fp32
    assert_only_the_version_in_force(target)


def test_a_second_writer_is_refused_while_one_holds_the_bundle(tiny_index_dir, tmp_path):
    target, _ = copy(tiny_index_dir, tmp_path / "index")
    with (
        pytest.raises(BundleError, match="another process is writing"),
        bundle.new_version(target, overwrite=True),
        bundle.new_version(target, overwrite=True),
    ):
        pass
    assert IndexBundle.load(target).size == IndexBundle.load(tiny_index_dir).size


def test_a_folder_of_other_files_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with (
        pytest.raises(BundleError, match="not a ragmix bundle"),
        bundle.new_version(tmp_path, True),
    ):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"
