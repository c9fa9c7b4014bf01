"""Where this process sits in a job: torchrun's process group and the 4D mesh built on it.

`build_parallel_context(parallel_cfg)` joins torchrun's default group (NCCL on CUDA, gloo on CPU)
and builds the mesh of the `[parallel]` section; one process (no WORLD_SIZE) gets the context of a
single rank, mesh None. The trainer asks the context only where run-level I/O happens: rank 0
alone writes the run folder, metrics and the summary.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llama3hp.errors import ConfigError
from llama3hp.parallel.mesh import DeviceMesh4D, ParallelConfig, build_mesh


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment: NCCL on CUDA, gloo on CPU.

    Returns (rank, world_size); (0, 1) without WORLD_SIZE. On CUDA it also selects the local GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the job: one process (no mesh), or a rank of a 4D mesh."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    mesh: DeviceMesh4D | None = None

    @property
    def is_leader(self) -> bool:
        """Global rank 0: the one rank that writes run-level files."""
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """All ranks of the layout (None on one process)."""
        return self.mesh.world_group if self.mesh is not None else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank of the layout."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (a no-op on one process)."""
        if self.mesh is not None and dist.is_initialized():
            dist.destroy_process_group()


def context_from_mesh(mesh: DeviceMesh4D | None) -> ParallelContext:
    if mesh is None or mesh.dims.world_size == 1:
        return ParallelContext()
    return ParallelContext(mesh.rank, mesh.dims.world_size, mesh.dp_rank, mesh.dims.dp, mesh)


def build_parallel_context(cfg: ParallelConfig) -> ParallelContext:
    """Join torchrun's process group and build the mesh of `cfg`; one process without WORLD_SIZE.
    Every launched rank must be part of the layout."""
    _, world = init_distributed()
    if world == 1:
        return ParallelContext()
    try:
        mesh = build_mesh(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mesh is None or mesh.dims.world_size != world:
        n = world if mesh is None else mesh.dims.world_size
        raise ConfigError(
            f"the [parallel] layout uses fewer ranks than the {world} launched ({n}): set parallel.dp=-1 "
            "or launch tp*cp*pp*dp processes"
        )
    return context_from_mesh(mesh)
