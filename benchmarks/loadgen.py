"""Load generator for a running ragmix server (same flags as `ragmix bench load`).

    python benchmarks/loadgen.py --target 127.0.0.1:50051 --concurrency 1,2,4,8,16 --duration 20 \
        --warmup 2s --out benchmarks/results/load.json --plots benchmarks/results/load

See benchmarks/README.md ("Load generator") for what each figure means.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from ragmix.bench.loadgen import main
except ImportError:  # a checkout without `pip install -e .`
    root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(root / "server"), str(root / "client")]
    from ragmix.bench.loadgen import main

if __name__ == "__main__":
    sys.exit(main())
