"""4D parallelism for llama3hp: mesh [TP, CP, PP, DP], tensor + sequence parallel, the paper's
context parallel, pipeline schedules and ZeRO data parallel; `plan` models step time and memory.

The training loop calls: `init_distributed`, `build_mesh`, `parallelize` -> `ParallelModel`
(`forward_backward`, `clip_grad_norm_`, `param_groups`, `after_optimizer_step`, `zero_grad`,
`full_state_dict`); see parallelize.py.
"""

from llama3hp.parallel.mesh import (
    DIM_ORDER,
    DeviceMesh4D,
    ParallelConfig,
    ParallelDims,
    build_mesh,
    init_distributed,
    resolve_dims,
    validate_layout,
)
from llama3hp.parallel.parallelize import MicroBatch, ParallelModel, parallelize

__all__ = [
    "DIM_ORDER",
    "DeviceMesh4D",
    "MicroBatch",
    "ParallelConfig",
    "ParallelDims",
    "ParallelModel",
    "build_mesh",
    "init_distributed",
    "parallelize",
    "resolve_dims",
    "validate_layout",
]
