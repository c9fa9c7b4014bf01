#!/usr/bin/env bash
# One node: ./launch/torchrun.sh CONFIG [key=value ...]
# e.g.  NGPUS=8 ./launch/torchrun.sh llama3_8b parallel.tp=8
# NGPUS defaults to the visible GPUs (or 2 CPU processes with gloo when there is no GPU).
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}
shift
if [[ -z "${NGPUS:-}" ]]; then
  NGPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# NVLink inside the node: NCCL picks it by itself; keep P2P on and the NVLS (NVLink SHARP) path allowed.
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
exec torchrun --standalone --nnodes=1 --nproc-per-node="$NGPUS" \
  -m llama3hp.cli train --config "$CONFIG" "$@"
