"""A run's checkpoints: when to save (`maybe_save`), and saving and resuming the model, the optimizer
and the trainer's state through the one checkpoint path of `llama3hp.train.checkpoint` (the same on
one process and on any mesh: every rank writes its shards under global names and shapes).

With `checkpoint.async = true` a save blocks the loop only while the state is copied to CPU memory
(`async_checkpoint.py`); the write, the manifest and the `latest` pointer follow in the background,
at most one save in flight. A checkpoint is never written from a non-finite state: a save whose
weights or AdamW moments hold a NaN or an Inf on any rank is refused (and said so), so pruning can
never leave only diverged checkpoints behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from llama3hp.errors import ConfigError
from llama3hp.parallel.step_model import StepModel
from llama3hp.train import checkpoint as ckpt


@dataclass
class CheckpointConfig:
    """Where and how often to save (torch.distributed.checkpoint folders `step-XXXXXXXX/`)."""

    enabled: bool = True  # save checkpoints at all
    dir: str = ""  # checkpoint folder ("" = <run dir>/checkpoints)
    interval: int = 0  # save every N steps (0 = only at the end)
    keep: int = 3  # keep the last K checkpoints (0 = keep all)
    save_final: bool = True  # save after the last step
    # TOML key `async`: copy the state to CPU memory and write it in the background (DCP async_save);
    # the loop waits only for the copy, and for the previous save if it is still being written.
    async_save: bool = False

    def validate(self) -> None:
        if self.interval < 0 or self.keep < 0:
            raise ConfigError("checkpoint.interval and checkpoint.keep must be >= 0")


def local_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a (nested) state dict held by this rank, ShardedTensors' local shards included."""
    if isinstance(obj, ShardedTensor):
        yield from (s.tensor for s in obj.local_shards())
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from local_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from local_tensors(v)


def all_finite(state: Any, group: dist.ProcessGroup | None) -> bool:
    """Whether every floating-point tensor of `state` is finite on every rank of `group` (one sync per
    device, one all-reduce). Each tensor's fp32 sum is NaN/Inf iff an element is (weights and AdamW
    moments are far from overflowing it): one read of the state, no temporary of its size
    (0.03 s against 1.3 s for isfinite(t).all() on 50M floats here, 2 busy cores)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in local_tensors(state):
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(t.detach().sum(dtype=torch.float32))
    bad = any(not bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())
    if group is not None:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        flag = torch.tensor([float(bad)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        bad = bool(flag.item())
    return not bad


def check_writable(folder: Path, what: str, rank: int = 0) -> str | None:
    """None if `folder` can be created and written (a probe file per rank), else a one-line error."""
    probe = folder / f".llama3hp-write-probe-{rank}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return f"the {what} {folder} is not writable ({reason}): fix its permissions or pick another folder"
    return None


class Checkpointer:
    """Saves and loads one run's checkpoints. `train_state()` gives the JSON state the trainer adds
    to each checkpoint (step counters, loader position, schedule, config, health)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        folder: Path,
        model: StepModel,
        optimizer: torch.optim.Optimizer,
        group: dist.ProcessGroup | None,
        train_state: Callable[[], dict[str, Any]],
        *,
        save_group: dist.ProcessGroup | None = None,
        log: Callable[[str], None] = print,
    ):
        self.cfg, self.folder, self.model, self.optimizer = cfg, folder, model, optimizer
        self.group, self.train_state, self.log = group, train_state, log
        self.last: Path | None = None
        self.pending: Any = None  # async_checkpoint.PendingSave in flight
        self.stager: Any = None
        self.save_group = save_group
        if cfg.async_save:
            from llama3hp.train.async_checkpoint import CpuStager

            if group is not None and save_group is None:
                # DCP's background thread runs collectives: never on the group the step uses. Only the
                # layout's ranks create it (use_local_synchronization), so ranks outside are not involved.
                ranks = list(range(dist.get_world_size(group)))
                self.save_group = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
            self.stager = CpuStager(self.save_group)

    def due(self, step: int, *, last: bool) -> bool:
        c = self.cfg
        return c.enabled and bool((c.interval and step % c.interval == 0) or (c.save_final and last))

    def maybe_save(self, step: int, *, last: bool) -> float | None:
        """Save step `step` when the interval or the end of the run says so; the seconds the loop was
        blocked (None when no save was due). The last save of a run is waited for."""
        if not self.due(step, last=last):
            return None
        return self.save(step, wait=last)

    def save(self, step: int, *, wait: bool = False) -> float:
        """Checkpoint `step` (in the background with async_save unless `wait`); the seconds it blocked."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        sd = self.model.checkpoint_state(self.optimizer, for_save=True)
        if not all_finite(sd, self.group):
            self.log(
                f"checkpoint: not saving step {step}: the weights or optimizer state hold NaN/Inf; "
                f"the last finite checkpoint stays {self.last or 'none'}"
            )
            return time.perf_counter() - t0
        common = dict(
            model_state=sd["model"], optim_state=sd.get("optim"), train_state=self.train_state(),
            rng=ckpt.rng_state(), keep=self.cfg.keep, group=self.group,
        )  # fmt: skip
        if self.stager is None:
            self.last = ckpt.save_checkpoint(self.folder, step, **common)  # type: ignore[arg-type]
        else:
            from llama3hp.train.async_checkpoint import save_checkpoint_async

            self.pending = save_checkpoint_async(
                self.folder,
                step,
                save_group=self.save_group,
                stager=self.stager,
                **common,  # type: ignore[arg-type]
            )
            if wait:
                self.wait()
        return time.perf_counter() - t0

    def wait(self) -> None:
        """The save in flight written and committed (collective over the layout)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.last = pending.wait()

    def load(
        self, path: Path, *, with_optimizer: bool = True, verify: bool = True, fresh: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Weights (and the optimizer state, when stored and asked for) of a checkpoint saved under
        any layout into this rank's model; returns its train state. `fresh`: parameters the
        checkpoint may lack (they keep their initial values)."""
        self.wait()
        optimizer = self.optimizer if with_optimizer else None
        return ckpt.load_checkpoint(path, self.model, optimizer, group=self.group, verify=verify, fresh=fresh)


def find_latest_checkpoint(cfg: CheckpointConfig, runs_root: str, name: str, run_dir: str = "") -> Path:
    """For a bare --resume: checkpoint.dir or run_dir if set, else the newest run of this name with a
    checkpoint."""
    if cfg.dir or run_dir:
        folder = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        found = latest_complete(folder)
        if found is None:
            raise ckpt.CheckpointError(
                f"nothing to resume: no complete checkpoint in {folder}; pass --resume PATH"
            )
        return found
    runs = sorted(
        Path(runs_root).glob(f"{name}-*/checkpoints/{ckpt.LATEST}"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ckpt.CheckpointError(
            f"nothing to resume: no checkpoint under {runs_root}/{name}-*/checkpoints; pass --resume PATH"
        )
    return ckpt.resolve_checkpoint(runs[-1].parent)


def latest_complete(folder: Path) -> Path | None:
    """The checkpoint `latest` names in `folder` if it is complete, else the newest complete one (a
    manifest present: rank 0 writes it last, after every rank's files), else None."""
    candidates = list(reversed(ckpt.list_checkpoints(folder)))
    pointer = folder / ckpt.LATEST
    if pointer.is_file():
        try:
            candidates.insert(0, folder / ckpt.read_latest(pointer))
        except ckpt.CheckpointError:
            pass  # a garbage pointer: fall back to the folders themselves
    for path in candidates:
        if (path / ckpt.MANIFEST).is_file():
            return path
    return None
