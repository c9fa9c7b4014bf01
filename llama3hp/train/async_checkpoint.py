"""Checkpoints written in the background: DCP's `async_save` behind the same commit protocol.

    pending = save_checkpoint_async(folder, step, state, ...)  # blocks only to copy the state to CPU
    ...                                                         # training goes on
    path = pending.wait()                                       # every rank, before the next save

The loop is blocked while `CpuStager` copies this rank's tensors (model shards, AdamW moments)
into CPU buffers it keeps from one save to the next (pinned on CUDA: a device-to-host copy at PCIe
speed; on CPU a memcpy into pages that are already mapped). DCP then writes the copy from a
thread of its own, over a gloo process group of its own: its collectives (the save plan, the
metadata) must never interleave with the training step's on the same group.

The commit is the one of `checkpoint.save_checkpoint`: everything goes into `step-N.tmp/`; when
rank 0's DCP future completes (DCP's coordinator writes `.metadata` only after every rank's files
are written) the same DCP thread writes train_state.json, rng.pkl, the SHA-256 manifest, renames the
folder and moves `latest` LAST. A crash at any point of the background write leaves `latest` on
the previous complete checkpoint. At most one save is in flight: the next save (and the end of the
run) first `wait()`s for the previous one, which also turns a background failure (a full disk)
into the same one-line error on every rank.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.staging import AsyncStager

from llama3hp.parallel.checkpoint_views import block_tensor
from llama3hp.train import checkpoint as ckpt

# DCP warns from its writer thread, on every save of one process, that no process group exists; a
# filter in the caller's thread (checkpoint.quiet_dcp) does not reach that thread.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


class CpuStager(AsyncStager):
    """Copies a state dict's tensors (plain or ShardedTensor local shards) into CPU buffers that are
    reused by every later save of the same shapes (the first save allocates them)."""

    _synchronize_after_execute = False

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.buffers: dict[str, torch.Tensor] = {}

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self.buffers[key] = buf
        buf.copy_(t.detach(), non_blocking=t.device.type == "cuda")
        return buf

    def _stage(self, obj: Any, key: str) -> Any:
        if isinstance(obj, ShardedTensor):
            blocks = [
                (tuple(s.metadata.shard_offsets), self._copy(f"{key}#{i}", s.tensor))
                for i, s in enumerate(obj.local_shards())
            ]
            if not blocks:
                return obj  # nothing local: DCP only reads its metadata
            return block_tensor(tuple(obj.size()), blocks, self.group)
        if isinstance(obj, torch.Tensor):
            return self._copy(key, obj)
        if isinstance(obj, dict):
            return {k: self._stage(v, f"{key}.{k}") for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._stage(v, f"{key}.{i}") for i, v in enumerate(obj)]
        return obj

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        out = self._stage(state_dict, "")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return out

    def synchronize_staging(self) -> None:
        return None  # `stage` returns only once the copy is complete

    def close(self) -> None:
        self.buffers.clear()


class PendingSave:
    """One checkpoint being written in the background (see the module docstring)."""

    def __init__(self, future: Future, tmp: Path, final: Path, group: dist.ProcessGroup | None):
        self.future, self.tmp, self.final, self.group = future, tmp, final, group
        self.finished = threading.Event()  # rank 0: the commit after the write is done (or failed)
        self.error: str | None = None

    def done(self) -> bool:
        return self.future.done() and (not self._leader or self.finished.is_set())

    @property
    def _leader(self) -> bool:
        return self.group is None or dist.get_rank(self.group) == 0

    def wait(self) -> Path:
        """Block until the write and rank 0's commit are done; the same one-line error on every rank
        of `group` if either failed. Collective over `group`."""
        err = None
        try:
            self.future.result()
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            err = (
                ckpt.disk_error(e, self.final.parent) or f"saving checkpoint {self.final} failed: {_text(e)}"
            )
        if self._leader:
            self.finished.wait()
            err = err or self.error
            if err is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        ckpt.raise_shared(err, self.group)
        return self.final


def _text(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if failures:
        return ckpt.failure_text(e)  # type: ignore[arg-type]
    return str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__


def save_checkpoint_async(
    folder: Path,
    step: int,
    *,
    model_state: dict[str, Any],
    optim_state: dict[str, Any] | None,
    train_state: dict[str, Any],
    rng: dict[str, Any] | None,
    keep: int,
    group: dist.ProcessGroup | None,
    save_group: dist.ProcessGroup | None,
    stager: CpuStager,
) -> PendingSave:
    """Start checkpoint `step`: returns once this rank's state is copied to CPU. `group` is the layout's
    world group (agreement on errors, in the caller's thread), `save_group` a gloo group over the same
    ranks used only by DCP's background thread."""
    tmp, final = ckpt.begin_save(folder, step, group)
    state: dict[str, Any] = {"model": model_state}
    if optim_state is not None:
        state["optim"] = optim_state
    with ckpt.quiet_dcp():
        future = dcp.async_save(
            state, checkpoint_id=str(tmp), process_group=save_group, async_stager=stager,
            no_dist=save_group is None,
        )  # fmt: skip
    assert isinstance(future, Future)  # a stager that copies synchronously: DCP returns a plain Future
    pending = PendingSave(future, tmp, final, group)
    if pending._leader:
        kind = "full" if optim_state is not None else "weights"

        def commit(f: Future) -> None:
            try:
                if f.exception() is None:
                    ckpt.finish_save(
                        tmp, final, train_state=train_state, kind=kind, step=step, rng=rng, keep=keep
                    )
            except OSError as e:
                pending.error = ckpt.disk_error(e, folder) or f"finishing checkpoint {final} failed: {e}"
            finally:
                pending.finished.set()

        future.add_done_callback(commit)
    return pending
