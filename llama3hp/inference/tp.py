"""Tensor-parallel serving: one process per GPU, rank 0 schedules, every rank runs the forward.

`llama3hp serve --tp N` starts N-1 worker processes itself (or runs under torchrun with N
processes). Every rank loads its shards (`load_serving_model(..., group=...)`: `apply_tp` with the
existing tensor-parallel modules, KV heads and cache split the same way) and builds an
`LLMEngine` over the TP group. Rank 0 runs the scheduler, the sampler and the HTTP server; before
each step it broadcasts the step's inputs (`runner.StepInputs`) and the other ranks run the same
forward in `ModelRunner.serve_worker` (their logits are the same: the head gathers the
vocabulary), until rank 0 broadcasts None at shutdown. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int, timeout_s: float = 1800.0) -> dist.ProcessGroup:
    """Join a `world`-rank group over loopback TCP (NCCL on CUDA, each rank on its own GPU; gloo
    on CPU); returns the whole group."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    assert dist.group.WORLD is not None
    return dist.group.WORLD


def rank_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _worker(rank: int, world: int, port: int, build: Callable[[dist.ProcessGroup, int], Any]) -> None:
    group = join_group(rank, world, port)
    try:
        engine = build(group, rank)
        engine.runner.serve_worker()
    finally:
        dist.destroy_process_group()


def start_group(tp: int, build: Callable[[dist.ProcessGroup, int], Any]) -> tuple[dist.ProcessGroup, list]:
    """Rank 0 of a `tp`-rank serving group: under torchrun join its group; else spawn ranks
    1..tp-1, each running `build(group, rank)` (a module-level function returning its LLMEngine)
    and then the worker loop. Returns (group, the spawned processes)."""
    if "WORLD_SIZE" in os.environ:
        from llama3hp.parallel.distributed import init_distributed

        rank, world, _ = init_distributed()
        if world != tp:
            raise ValueError(f"--tp {tp} but torchrun started {world} processes")
        assert dist.group.WORLD is not None
        if rank != 0:
            engine = build(dist.group.WORLD, rank)
            engine.runner.serve_worker()
            dist.destroy_process_group()
            raise SystemExit(0)
        return dist.group.WORLD, []
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, tp, port, build), daemon=True) for r in range(1, tp)]
    for p in procs:
        p.start()
    return join_group(0, tp, port), procs
