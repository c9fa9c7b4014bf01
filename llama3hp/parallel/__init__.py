"""4D parallelism for llama3hp: mesh [TP, CP, PP, DP], tensor + sequence parallel, the paper's
context parallel, pipeline schedules, ZeRO data parallel and activation checkpointing, applied to a
plain model from outside; `plan` models step time and memory.

The trainer calls `build_parallel_context` (torchrun's group and the mesh), then `parallelize`,
which returns the step interface (`StepModel`: `forward_backward`, `clip_grad_norm_`,
`param_groups`, `after_optimizer_step`, `zero_grad`, checkpoint state) on one process and on any
mesh alike; see parallelize.py and step_model.py.
"""

from llama3hp.parallel.distributed import (
    ParallelContext,
    build_parallel_context,
    context_from_mesh,
    init_distributed,
)
from llama3hp.parallel.mesh import (
    DIM_ORDER,
    DeviceMesh4D,
    ParallelConfig,
    ParallelDims,
    build_mesh,
    resolve_dims,
    validate_layout,
)
from llama3hp.parallel.parallelize import ParallelModel, parallelize
from llama3hp.parallel.step_model import LocalModel, StepModel, StepStats

__all__ = [
    "DIM_ORDER",
    "DeviceMesh4D",
    "LocalModel",
    "ParallelConfig",
    "ParallelContext",
    "ParallelDims",
    "ParallelModel",
    "StepModel",
    "StepStats",
    "build_mesh",
    "build_parallel_context",
    "context_from_mesh",
    "init_distributed",
    "parallelize",
    "resolve_dims",
    "validate_layout",
]
