#!/usr/bin/env bash
# What a session with a lent GPU runs, in phases sized to the device tool's limits (one command
# at most 10 minutes, 30 minutes of device time per session, at most 8 files back from $OUT):
#
#   tests      the kernel, attention, FP8 and model tests on CUDA (compiled Triton/CUDA, bf16/FP8)
#   kernels    bench_rmsnorm, bench_rope, bench_swiglu, bench_cross_entropy
#   attention  bench_attention
#   fp8        bench_fp8_linear
#   posttrain  bench_logprobs (DPO's loss from hidden states: time and memory at 8K and 32K tokens
#              against the materialised path and Liger), then its --max-fit (longest that fits)
#   e2e        bench_e2e: the 1B at 8K on the stdlib corpus, bf16 vs FP8, 500 steps of GLOBAL_ROWS
#              rows (default 2: ~2.5 min per recipe on an H100 at 50% MFU, so both fit one call)
#   serve      bench_paged_attention, then bench_serve at 8B shapes (bf16 and FP8 vs HF generate,
#              which needs transformers in .whl/), and the serving tests on CUDA (CUDA graphs)
#
# Usage, on the GPU machine from the repository root:  bash benchmarks/gpu_session.sh PHASE...
# Suggested calls (a fresh machine each, ~1-2 min to start):  "tests kernels", "attention fp8", "e2e",
# "serve".
# Before the session, here: bash benchmarks/fetch_wheels.sh (Liger and the tokenizer package, which
# the GPU image lacks, into .whl/), then pass carry=[".whl"] to each device call.
#
# Every phase installs the package when it is not importable, and the call stops starting new work
# LIMIT_S seconds (default 560) after it began, so it ends inside the device limit. Everything lands
# straight in $OUT, updated after each step, so a call cut off still returns what finished:
#   env.txt (date, GPU, versions, exit codes), session.log (all output), results.tgz
#   (benchmarks/results/<device>/*.{json,md}). Back here: tar -xzf results.tgz over the checkout and
#   commit benchmarks/results/<device>/.
set -uo pipefail
out=${OUT:-/tmp/llama3hp-gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
limit=${LIMIT_S:-560}
global_rows=${GLOBAL_ROWS:-2}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
log="$out/session.log"
env_txt="$out/env.txt"
[ $# -gt 0 ] || set -- tests kernels

note() { echo "$*" | tee -a "$env_txt"; }

collect() {  # results.tgz, replaced atomically so a kill mid-write leaves the last good one
  if [ -d benchmarks/results ]; then
    tar -czf "$out/results.tgz.tmp" benchmarks/results && mv "$out/results.tgz.tmp" "$out/results.tgz"
  fi
}

step() {  # step NAME CMD...: run CMD under the time left, log it, record its exit code
  local name=$1; shift
  local left=$((limit - SECONDS))
  if [ "$left" -lt 30 ]; then
    note "$name: not started, ${left}s left of LIMIT_S=$limit (run it in the next call)"
    return
  fi
  local t0=$SECONDS
  echo "== $name ($(date -u +%H:%M:%S), ${left}s left): $*" | tee -a "$log"
  timeout "$left" "$@" 2>&1 | tee -a "$log"
  note "$name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
  collect
}

setup() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  phases: $*  commit: $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  } >> "$env_txt" 2>&1
  if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! $py -c "import llama3hp.kernels, llama3hp._C" 2> /dev/null; then
    local t0=$SECONDS
    $py -m pip install -q --no-build-isolation --no-deps -e . >> "$log" 2>&1 || note "install failed (session.log)"
    note "install: $((SECONDS - t0))s"
  fi
  $py - >> "$env_txt" 2>&1 << 'EOF'
import importlib.util
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)
from llama3hp.fp8.cuda_ops import cuda_ext_available
have = {m: importlib.util.find_spec(m) is not None for m in ("liger_kernel", "flash_attn", "transformer_engine", "tiktoken")}
print("llama3hp._fp8_cuda built:", cuda_ext_available(), "| optional:", have)
EOF
}

setup "$@"
for phase in "$@"; do
  case $phase in
    tests)
      # test_aot_compile is the CPU-side compile check: nothing for a GPU to add.
      step tests $py -m pytest -q -p no:cacheprovider -n 8 --timeout 300 -r fEs \
        --ignore tests/kernels/test_aot_compile.py tests/kernels tests/fp8 tests/model ;;
    kernels)
      for b in rmsnorm rope swiglu cross_entropy; do step "bench_$b" $py -m "benchmarks.bench_$b"; done ;;
    attention)
      step bench_attention $py -m benchmarks.bench_attention ;;
    fp8)
      step bench_fp8_linear $py -m benchmarks.bench_fp8_linear ;;
    posttrain)
      step bench_logprobs $py -m benchmarks.bench_logprobs
      step bench_logprobs_fit $py -m benchmarks.bench_logprobs --max-fit ;;
    serve)
      step test_inference $py -m pytest -q -p no:cacheprovider -x -r fEs tests/inference tests/kernels/test_paged_attention.py
      step bench_paged_attention $py -m benchmarks.bench_paged_attention
      step bench_serve $py -m benchmarks.bench_serve ;;
    e2e)
      step bench_e2e $py -m benchmarks.bench_e2e --steps 500 \
        --set "training.global_batch_rows=$global_rows" "training.micro_batch_rows=$global_rows" ;;
    *)
      note "unknown phase $phase (tests kernels attention fp8 e2e serve)" ;;
  esac
done
collect
ls -la "$out"
cat "$env_txt"
