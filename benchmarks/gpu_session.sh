#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (device time is scarce):
#   1. build the package there (the C++ index builders and, with nvcc + CUDA torch, the FP8 CUDA kernel);
#   2. the kernel, attention and FP8 tests on CUDA (the compiled Triton/CUDA paths in bf16/fp16/FP8);
#   3. every benchmark (full shapes), which writes benchmarks/results/<device>/*.{json,md};
#   4. one tarball of results and logs in $OUT (the device tool returns at most 8 files).
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh [OUT_DIR]
# Then, back here: unpack the tarball over the checkout and commit benchmarks/results/<device>/.
set -uo pipefail
out=${1:-${OUT:-/tmp/llama3hp-gpu}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} > "$out/env.txt" 2>&1
$py -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 || echo "install failed (see install.log)" >> "$out/env.txt"
# Test time is bounded so the benchmarks always get their turn.
timeout 900 $py -m pytest -q -p no:cacheprovider -n 4 tests/kernels tests/fp8 tests/model > "$out/gpu-tests.log" 2>&1
echo "tests exit $?" >> "$out/env.txt"
timeout 1200 $py -m benchmarks.run_all > "$out/bench.log" 2>&1
echo "benchmarks exit $?" >> "$out/env.txt"
tar -czf "$out/gpu-results.tgz" benchmarks/results "$out"/*.txt "$out"/*.log 2>/dev/null
ls -la "$out"
