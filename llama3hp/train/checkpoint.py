"""Checkpoints: torch.distributed.checkpoint (DCP) folders with a SHA-256 manifest.

Layout of a checkpoint folder (`<dir>/step-XXXXXXXX/`):
- DCP files (`.metadata`, `__*.distcp`) holding {"model": ..., "optim": ...} (optim is absent in a
  weights-only checkpoint such as one made by `llama3hp import` or `llama3hp average`);
- `train_state.json`: kind ("full" | "weights"), step, tokens seen, loader state, the resolved
  config, the model args;
- `rng.pkl`: python, numpy, torch CPU and CUDA RNG states (pickled: torch states are tensors);
- `manifest.sha256.json`: SHA-256 of every other file, checked before DCP reads anything (DCP has
  no checksum: a flipped bit in a shard would load silently).

A save writes everything into `step-XXXXXXXX.tmp/`, writes the manifest, renames the folder, then
updates the `latest` pointer file (temp name + rename) LAST: a crash at any point leaves `latest`
on the previous complete checkpoint. Only the last `keep` checkpoints are kept.

On a mesh (`group` given) every rank writes its own shards into the temp folder through DCP (a
collective: it returns once every rank's files and the `.metadata` exist); rank 0 alone writes the
run-level files, the manifest over every rank's files, renames and moves `latest`; its outcome is
broadcast so every rank raises the same one-line error. Loading verifies the manifest on rank 0
only. The stored tensors always have global shapes (see `llama3hp/parallel/checkpoint_views.py`), so any
layout, or one process, reads them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llama3hp.errors import UserError

MANIFEST = "manifest.sha256.json"
TRAIN_STATE = "train_state.json"
RNG_STATE = "rng.pkl"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted; the message is one line."""


class CheckpointMismatch(CheckpointError, ValueError):
    """Checkpoints (or a checkpoint and a config) that do not fit together."""


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def quiet_dcp():
    # DCP warns on every call that no process group exists; single-process saves are intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        # Mesh checkpoints hand DCP ShardedTensors of arbitrary row blocks (parallel/checkpoint_views.py): the
        # one DCP container that takes per-rank chunk lists; DTensor placements cannot express them.
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {str(p.relative_to(folder)): _sha256(p) for p in files}}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def verify_checkpoint(folder: Path) -> None:
    """CheckpointError naming the first file whose SHA-256 differs from the manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST})")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"unreadable checkpoint manifest {manifest_path}: {e}") from None
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint file corrupted (SHA-256 mismatch): {path}")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder from a step folder, a checkpoint folder (via `latest`) or a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MANIFEST).is_file() or STEP_RE.match(path.name):
        return path
    for folder in (path, path / "checkpoints"):
        latest = folder / LATEST
        if latest.is_file():
            return folder / read_latest(latest)
    raise CheckpointError(f"no checkpoint in {path} (no '{LATEST}' pointer and no step-XXXXXXXX folder)")


def read_latest(latest: Path) -> str:
    """The step folder name a `latest` pointer holds; one-line error naming the file otherwise."""
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not STEP_RE.match(name):
        raise CheckpointError(
            f"{latest} is not a checkpoint pointer (expected one line 'step-XXXXXXXX'): delete it, or pass "
            "--resume PATH/step-XXXXXXXX"
        )
    if not (latest.parent / name).is_dir():
        raise CheckpointError(f"{latest} points to a missing checkpoint {latest.parent / name}")
    return name


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place (the step a crash test interrupts)."""
    if final.exists():  # re-saving a step (e.g. after a resume): the new one wins
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def begin_save(folder: Path, step: int, group: dist.ProcessGroup | None) -> tuple[Path, Path]:
    """(temp folder, final folder) of checkpoint `step`: rank 0 makes an empty temp folder (removing
    one a crash left), every rank of `group` gets its outcome."""
    final = folder / step_dirname(step)
    tmp = folder / (final.name + ".tmp")
    err = None
    if group is None or dist.get_rank(group) == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
            tmp.mkdir()
        except OSError as e:
            err = disk_error(e, folder) or f"cannot create checkpoint folder {tmp}: {e.strerror}"
    raise_shared(err, group)
    return tmp, final


def finish_save(
    tmp: Path, final: Path, *, train_state: dict[str, Any], kind: str, step: int, rng: dict[str, Any] | None,
    keep: int,
) -> None:  # fmt: skip
    """Rank 0, once every rank's DCP files and `.metadata` exist: the run-level files, the manifest over
    every file, the rename into place, `latest` LAST, then pruning. OSError on failure (the caller
    removes `tmp`)."""
    meta = {**train_state, "kind": kind, "step": step}
    (tmp / TRAIN_STATE).write_text(json.dumps(meta, indent=1) + "\n")
    if rng is not None:
        with open(tmp / RNG_STATE, "wb") as f:
            pickle.dump(rng, f)
    write_manifest(tmp)
    _publish(tmp, final)
    _write_atomic(final.parent / LATEST, (final.name + "\n").encode())
    if keep > 0:
        for old in list_checkpoints(final.parent)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def disk_error(e: BaseException, folder: Path) -> str | None:
    """The one-line message for a full disk (ENOSPC/EDQUOT anywhere in `e`, a DCP failure included),
    naming the folder and its free space; None for any other error."""
    excs: list[BaseException] = [e]
    failures = getattr(e, "failures", None) or {}
    excs += [exc for exc, _trace in failures.values()]
    if not any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in excs):
        return None
    try:
        free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return f"no space left for checkpoints in {folder} ({free}): free space or set checkpoint.dir to another disk"


def remove_partial(tmp: Path, group: dist.ProcessGroup | None) -> None:
    """Rank 0 removes a failed save's temp folder once every rank is done writing into it."""
    if group is not None:
        dist.barrier(group=group)
    if group is None or dist.get_rank(group) == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    folder: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
    train_state: dict[str, Any],
    rng: dict[str, Any] | None = None,
    keep: int = 0,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Write checkpoint `step` under `folder`; return its path. keep > 0 prunes older ones.

    train_state must be JSON-serialisable; "kind" is set to "full" or "weights". With `group` (a
    mesh's world group) every rank of it calls this with its own sharded states; train_state and
    rng are read on rank 0 only. A full disk is one line naming the folder and its free space, and
    leaves no temp folder behind.
    """
    folder = Path(folder)
    tmp, final = begin_save(folder, step, group)
    state: dict[str, Any] = {"model": model_state}
    if optim_state is not None:
        state["optim"] = optim_state
    try:
        with quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp), process_group=group)
    except CheckpointException as e:  # a BaseException: would otherwise escape `except Exception`
        remove_partial(tmp, group)
        raise CheckpointError(
            disk_error(e, folder) or f"saving checkpoint {final} failed: {failure_text(e)}"
        ) from None
    err = None
    if group is None or dist.get_rank(group) == 0:
        kind = "full" if optim_state is not None else "weights"
        try:
            # every rank's DCP files exist: dcp.save returned on all of them
            finish_save(tmp, final, train_state=train_state, kind=kind, step=step, rng=rng, keep=keep)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = disk_error(e, folder) or f"finishing checkpoint {final} failed: {e}"
    raise_shared(err, group)
    return final


def failure_text(e: CheckpointException) -> str:
    """One line from a CheckpointException: the first failing rank's own error when it carries one."""
    failures = getattr(e, "failures", None) or {}
    for rank, (exc, _trace) in sorted(failures.items()):
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return f"rank {rank}: {text[0][:300]}"
    return str(e).strip().splitlines()[-1][:300]


def raise_shared(err: str | None, group: dist.ProcessGroup | None) -> None:
    """Rank 0's error (or None) raised on every rank of `group`; a barrier in any case."""
    if group is not None:
        box = [err]
        dist.broadcast_object_list(box, group=group, group_src=0)
        err = box[0]
    if err is not None:
        raise CheckpointError(err)


def verify_checkpoint_shared(folder: Path, group: dist.ProcessGroup | None) -> None:
    """verify_checkpoint on rank 0 of `group` (hashing every file once, not once per rank)."""
    err = None
    if group is None or dist.get_rank(group) == 0:
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            err = str(e)
    raise_shared(err, group)


def read_train_state(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / TRAIN_STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / TRAIN_STATE}: {e}") from None


def read_rng_state(path: Path) -> dict[str, Any] | None:
    f = path / RNG_STATE
    if not f.is_file():
        return None
    with open(f, "rb") as fh:
        return pickle.load(fh)


def dcp_load(state: dict[str, Any], path: Path, group: dist.ProcessGroup | None = None) -> None:
    """DCP load into `state` in place (collective over `group`); CheckpointError on failure."""
    try:
        with quiet_dcp():
            dcp.load(state, checkpoint_id=str(path), process_group=group)
    except CheckpointException as e:
        raise CheckpointError(f"loading checkpoint {path} failed: {failure_text(e)}") from None


def stored_shapes(path: Path, section: str = "model") -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{key: (shape, dtype)} of the tensors saved under `section` (keys without the prefix)."""
    reader = dcp.FileSystemReader(str(path))
    out = {}
    for key, md in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(section + ".") and isinstance(md, TensorStorageMetadata):
            out[key[len(section) + 1 :]] = (md.size, md.properties.dtype)
    return out


def load_model_state(path: str | Path, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint as CPU tensors, without building the model."""
    path = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(path)
    sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored_shapes(path).items()}
    if not sd:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    state = {"model": sd}
    dcp_load(state, path)
    return state["model"]


def check_model_matches(path: Path, shapes: dict[str, tuple[int, ...]], fresh: Collection[str] = ()) -> None:
    """One-line error unless the checkpoint's model tensors have the global shapes the config builds
    (the keys in `fresh` may be absent)."""
    stored = stored_shapes(path)
    for key, shape in shapes.items():
        if key in fresh and key not in stored:
            continue
        if key not in stored:
            raise CheckpointError(f"checkpoint {path} has no '{key}': it was saved from a different model")
        if tuple(stored[key][0]) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {path} has '{key}' of shape {tuple(stored[key][0])} but the config builds "
                f"{tuple(shape)}: set model.preset / model fields to match the checkpoint"
            )


def _step_model(model: Any) -> Any:
    """A StepModel (`llama3hp.parallel.step_model`) for `model`; a plain nn.Module is wrapped."""
    if isinstance(model, torch.nn.Module):
        from llama3hp.parallel.step_model import LocalModel

        return LocalModel(model)
    return model


def save_model_checkpoint(
    folder: str | Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer | None,
    *,
    train_state: dict[str, Any],
    rng: dict[str, Any] | None = None,
    keep: int = 0,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Checkpoint `step` of a model (a StepModel on one process or a mesh, or an nn.Module) and its
    AdamW state: every rank writes its unique shards under the global names and shapes (see
    `save_checkpoint` for the protocol and `llama3hp/parallel/checkpoint_views.py` for the views)."""
    sd = _step_model(model).checkpoint_state(optimizer, for_save=True)
    return save_checkpoint(
        folder, step, model_state=sd["model"], optim_state=sd.get("optim"), train_state=train_state,
        rng=rng, keep=keep, group=group,
    )  # fmt: skip


def load_checkpoint(
    path: str | Path,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    verify: bool = True,
    fresh: Collection[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint saved under any layout (or by one process, `import` or `average`) into
    `model` (a StepModel: this rank's shards; or an nn.Module) and, if given and stored, the AdamW
    state; return its train state (plus "path", and "fresh": the keys of `fresh` the checkpoint
    lacks, which keep the model's own values: a reward head started on a language model's
    checkpoint). RNG states are left to the caller."""
    model = _step_model(model)
    path = resolve_checkpoint(path)
    if verify:
        verify_checkpoint_shared(path, group)
    meta = read_train_state(path)
    check_model_matches(path, model.global_shapes(), fresh)
    missing = sorted(set(fresh) & set(model.global_shapes()) - set(stored_shapes(path)))
    with_optim = optimizer is not None and meta.get("kind") == "full" and not missing
    state = model.checkpoint_state(optimizer if with_optim else None, for_save=False)
    # The views alias the model's own buffers: leaving a key out of the load keeps its values.
    wanted = {**state, "model": {k: v for k, v in state["model"].items() if k not in missing}}
    dcp_load(wanted, path, group)
    model.finish_load(optimizer if with_optim else None, state)
    return {**meta, "path": str(path), "fresh": missing}
