#!/usr/bin/env bash
# One node: ./launch/torchrun.sh CONFIG [key=value ...]
# e.g.  NGPUS=8 ./launch/torchrun.sh llama3_8b parallel.tp=8
# NGPUS defaults to the visible GPUs (or 2 CPU processes with gloo when there is no GPU).
#
# Self-managing: torchrun restarts every worker up to MAX_RESTARTS times (default 3) after any
# worker fails (a crash, a kill, the watchdog aborting a hung step), and each restart continues
# the run's latest complete checkpoint (training.resume=auto; the run folder is run_dir, else
# runs/<name>, the same on every restart). llama3hp gives each restart a fresh rendezvous
# (llama3hp/parallel/distributed.py job_store), so the process groups re-form on gloo and NCCL.
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}
shift
PYTHON=${PYTHON:-python}
if [[ -z "${NGPUS:-}" ]]; then
  NGPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# The config and its layout checked once, before any rank starts: a layout error is one line and
# exit code 2 (under torchrun every rank would print it, then the launcher its ChildFailedError
# block, and the restarts would try again).
"$PYTHON" -m llama3hp.cli train --config "$CONFIG" training.resume=auto "$@" --check "$NGPUS" >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# NVLink inside the node: NCCL picks it by itself; keep P2P on and the NVLS (NVLink SHARP) path allowed.
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Flight recorder for hang diagnosis (see slurm/nccl_env.sh).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NGPUS" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m llama3hp.cli train --config "$CONFIG" training.resume=auto "$@"
