"""`ragmix serve` with a step gate a test controls through a file, to hold streams open by mechanism.

    python tests/gated_server.py GATE_FILE [serve flags...]

GATE_FILE holds a number M: before each step the engine waits while some request that is not
cancelled has streamed M or more tokens (so a stream stops after M tokens and can never finish,
on any machine, until the test writes a larger number or "release"). A cancelled request lets the
step run, so cancellation and deadlines still free their rows.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ragmix.cli import _serve, build_parser

POLL_S = 0.005


def gate(path: Path):
    def wait(running: Sequence[object]) -> None:
        while True:
            text = path.read_text().strip() if path.exists() else "release"
            if text == "release":
                return
            limit = int(text)
            held = [
                r for r in running if not r.cancelled and len(getattr(r, "tokens", ())) >= limit
            ]
            if not held:
                return
            time.sleep(POLL_S)

    return wait


def main(argv: list[str]) -> int:
    gate_file, serve_args = Path(argv[0]), argv[1:]
    return _serve(build_parser().parse_args(["serve", *serve_args]), step_gate=gate(gate_file))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
