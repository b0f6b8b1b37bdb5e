"""The committed stubs must be what the .proto generates today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_contract_names():
    from ragmix_client.proto import ragmix_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["RagService"]
    assert svc.full_name == "ragmix.v1.RagService"
    assert {m.name for m in svc.methods} == {"Generate", "Score", "Retrieve", "GetInfo"}
    assert pb.Mixture.Name(3) == "MIXTURE_CONCAT"
    assert pb.FinishReason.Name(3) == "FINISH_REASON_STOP"
