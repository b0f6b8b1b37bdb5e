#!/usr/bin/env bash
# The GPU path checked on a CUDA machine, offline, in one run (under 8 minutes on an H200):
#   bash benchmarks/gpu_check.sh [WHEELS_DIR]
# 1. installs what the machine lacks from WHEELS_DIR (default: $RAGMIX_GPU_WHEELS, else
#    shared/wheels; benchmarks/gpu_wheels.sh fills it, splitting wheels over 60 MiB into parts
#    that are joined here) and this checkout (--no-deps); a machine that has them needs no folder;
# 2. runs the GPU tests: the CUDA mixture kernel against the numpy reference at real sizes (K up
#    to 20, V up to 151,936), IO-bound CUDA decoding against CPU decoding on the tiny bundles and
#    the default bundle (same greedy tokens), no host copy in a RAG-Token answer, FAISS GPU top-K
#    against the CPU index on flat;
# 3. prints benchmarks/gpu.py's table (decode step, kernel, TTFT, tokens/s at 1/16/64 streams,
#    FAISS flat QPS at 1M, host copies), each figure beside its CPU baseline from the same run.
# Whatever could not run is listed at the end with why; the exit status is 0 only when all ran.
# Results: benchmarks/results/gpu.json, and $OUT/ (the device tool's folder) when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-${RAGMIX_GPU_WHEELS:-shared/wheels}}"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS" benchmarks/results
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export RAGMIX_CACHE_DIR="${RAGMIX_CACHE_DIR:-$PWD/.gpu-check-cache}"
FAILED=()
SECONDS=0

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, note a failure and go on
  local name=$1 limit=$2
  shift 2
  echo "=== [${SECONDS}s] $name"
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ", over ${limit}s"))")
    echo "=== $name failed"
  fi
}

join_parts() {  # a wheel sent as NAME.whl.part-aa, -ab, ... is joined back into NAME.whl
  local dir=$1 first whole
  for first in "$dir"/*.whl.part-aa; do
    [ -e "$first" ] || continue
    whole="${first%.part-aa}"
    [ -e "$whole" ] || cat "${whole}".part-* >"$whole"
  done
}

install_missing() {
  if [ -d "$WHEELS" ]; then
    join_parts "$WHEELS"
    # onnxruntime-gpu provides the same module as the CPU build: only one may be installed.
    if ls "$WHEELS"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
      python -m pip uninstall -y -q onnxruntime >/dev/null 2>&1
    fi
    if ls "$WHEELS"/faiss_gpu*.whl >/dev/null 2>&1; then
      python -m pip uninstall -y -q faiss-cpu >/dev/null 2>&1
    fi
    python -m pip install -q --no-deps "$WHEELS"/*.whl || return 1
  else
    echo "no wheel folder $WHEELS: using what is installed"
  fi
  python -m pip install -q --no-deps --no-build-isolation -e . || return 1
}

report_stack() {
  python - <<'EOF'
import importlib.util
import onnxruntime as ort
from ragmix.index.gpu import gpus
from ragmix.models import device
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("cupy:", device.has_cupy(), " numba-cuda:", importlib.util.find_spec("numba_cuda") is not None)
print("FAISS GPUs:", gpus(), " --device auto resolves to", device.resolve("auto"))
EOF
}

step "install" 120 install_missing
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
step "stack" 60 report_stack
step "default bundles" 240 python -m ragmix.cli models export-default
step "GPU tests" 240 env RAGMIX_CUDA_TESTS=1 RAGMIX_CUDA_REAL_SIZES=1 RAGMIX_CUDA_DEFAULT=1 \
  python -m pytest -p no:cacheprovider -q tests/cuda --junitxml="$RESULTS/gpu_tests.xml"
step "benchmark table" 300 python benchmarks/gpu.py --out "$RESULTS/gpu.json"
[ "$RESULTS" != benchmarks/results ] && cp "$RESULTS/gpu.json" benchmarks/results/ 2>/dev/null
echo "=== done in ${SECONDS}s"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'could not run: %s\n' "${FAILED[@]}"
  exit 1
fi
