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


def restart_attempt() -> int:
    """How many times torchrun has restarted this job's workers (0 on the first launch)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_store(timeout_s: float) -> dist.Store:
    """The job's key-value store, under a prefix of its own for each restart attempt.

    torchrun's agents keep one TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE) and, in
    torch 2.13, hand every restarted worker the same MASTER_ADDR:MASTER_PORT without a per-attempt
    prefix. The process groups' keys (gloo's peer addresses, NCCL's unique ids, under the same group
    names "0", "1", ...) then still hold the dead attempt's values: on gloo the first restart fails
    with "Connection refused" to a peer port of the previous attempt and the next ones hang. One
    prefix per attempt is a fresh rendezvous every time, for gloo and NCCL alike.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # Without a torchrun agent (plain env:// launch) rank 0 hosts the store, as init_process_group would.
    store = dist.TCPStore(addr, port, world, is_master=not agent_hosts and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"llama3hp/attempt_{restart_attempt()}", store)


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, dist.Store | None]:
    """Initialise the default process group from torchrun's environment: NCCL on CUDA, gloo on CPU,
    through `job_store` (a fresh rendezvous per restart attempt).

    Returns (rank, world_size, store); (0, 1, None) without WORLD_SIZE. On CUDA it also selects the
    local GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), None
    if world == 1:
        return 0, 1, None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = job_store(timeout_s)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return rank, world, store


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the job: one process (no mesh), or a rank of a 4D mesh."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    mesh: DeviceMesh4D | None = None
    # The job's key-value store (torchrun's, under this attempt's prefix): heartbeats of the watchdog.
    store: Any = None

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


def context_from_mesh(mesh: DeviceMesh4D | None, store: Any = None) -> ParallelContext:
    if mesh is None or mesh.dims.world_size == 1:
        return ParallelContext()
    return ParallelContext(mesh.rank, mesh.dims.world_size, mesh.dp_rank, mesh.dims.dp, mesh, store)


def release_mesh(mesh: DeviceMesh4D) -> None:
    """Destroy a mesh's own process groups (not the default one) before another mesh replaces it
    over the same ranks (a stage boundary of the curriculum); collective over the mesh's ranks."""
    world = dist.group.WORLD
    groups = {
        id(g): g for g in (mesh.tp_group, mesh.cp_group, mesh.pp_group, mesh.dp_group, mesh.dp_cp_group)
    }
    if mesh.world_group is not None and mesh.world_group is not world:
        groups[id(mesh.world_group)] = mesh.world_group
    for g in groups.values():
        if g is not None and g is not world:
            dist.destroy_process_group(g)


def check_launch(cfg: ParallelConfig, world: int) -> None:
    """One-line ConfigError for [parallel] degrees that one process cannot run (no torchrun)."""
    if world > 1:
        return
    asked = {d: getattr(cfg, d) for d in ("tp", "cp", "pp", "dp") if getattr(cfg, d) > 1}
    if asked:
        need = cfg.tp * cfg.cp * cfg.pp * max(cfg.dp, 1)
        degrees = " ".join(f"parallel.{d}={v}" for d, v in asked.items())
        raise ConfigError(
            f"{degrees} needs {need} processes but this is one process: launch it with "
            f"torchrun --nproc-per-node={need} (launch/torchrun.sh), or set the degrees to 1"
        )


def build_parallel_context(cfg: ParallelConfig) -> ParallelContext:
    """Join torchrun's process group and build the mesh of `cfg`; one process without WORLD_SIZE.
    Every launched rank must be part of the layout."""
    check_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    _, world, store = init_distributed()
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
    return context_from_mesh(mesh, store)
