#!/usr/bin/env bash
# Fetch what the GPU machine lacks into benchmarks/wheels/ (gitignored; carried to the device tool, 64 MiB at most).
# Run on a machine with the registry; the GPU image has Python 3.12, torch and triton, and no network.
#   bash benchmarks/fetch_wheels.sh && du -sh benchmarks/wheels      # ~4 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p benchmarks/wheels
# megatron-core 0.16.1 (the version CI tests), Liger-Kernel (the kernel baseline), pytest and its dependencies
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d benchmarks/wheels \
  megatron-core==0.16.1 liger-kernel pytest pluggy iniconfig packaging pygments
ls -la benchmarks/wheels
