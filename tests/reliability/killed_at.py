"""Run a `ragmix` command that SIGKILLs itself just before its K-th call of a filesystem function.

    python killed_at.py FUNCTION K ragmix-args...      # FUNCTION: replace, fsync or rmtree

A kill by timing rarely lands in the few microseconds between two renames; this lands on each
step of writing a bundle in turn (the k-th os.replace, os.fsync or shutil.rmtree), as a power cut
or the OOM killer could. K = 0 runs the command unharmed.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys

from ragmix.cli import main

MODULES = {"replace": os, "fsync": os, "rmtree": shutil}


def die_on_call(name: str, k: int) -> None:
    module = MODULES[name]
    real = getattr(module, name)
    calls = 0

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


if __name__ == "__main__":
    function, k, *argv = sys.argv[1:]
    if int(k):
        die_on_call(function, int(k))
    sys.exit(main(argv))
