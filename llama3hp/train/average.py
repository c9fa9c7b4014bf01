"""Checkpoint averaging (Polyak averaging, as the Llama 3 paper does over its annealing checkpoints).

The model weights of k checkpoints are summed element-wise in fp32 and divided by k, then cast
back to each tensor's stored dtype and written as a new weights-only checkpoint (no optimizer
state: the average is a model to evaluate or export, or to start a new run from).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from llama3hp.train import checkpoint as ckpt


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with identical keys and shapes (fp32 accumulation)."""
    if not states:
        raise ckpt.CheckpointMismatch("nothing to average: give at least one checkpoint")
    keys = set(states[0])
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != keys:
            raise ckpt.CheckpointMismatch(
                f"checkpoint {i} has different tensors from checkpoint 0: they come from different models"
            )
    out = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for i, sd in enumerate(states):
            if sd[k].shape != ref.shape:
                raise ckpt.CheckpointMismatch(
                    f"'{k}' has shape {tuple(sd[k].shape)} in checkpoint {i} but {tuple(ref.shape)} in checkpoint 0"
                )
            acc += sd[k].float()
        out[k] = (acc / len(states)).to(ref.dtype)
    return out


def expand_checkpoints(paths: Sequence[str | Path], last: int = 0) -> list[Path]:
    """Step folders from the given paths; a checkpoint folder (with step-* inside) expands to its
    checkpoints, of which only the `last` newest are kept when last > 0."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        inner = ckpt.list_checkpoints(p) or ckpt.list_checkpoints(p / "checkpoints")
        if inner and not ckpt.STEP_RE.match(p.name):
            out += inner[-last:] if last > 0 else inner
        else:
            out.append(ckpt.resolve_checkpoint(p))
    if not out:
        raise ckpt.CheckpointError("no checkpoints to average")
    return out


def average_checkpoints(paths: Sequence[str | Path], out_dir: str | Path, *, last: int = 0) -> Path:
    """Average the model weights of `paths` (see `expand_checkpoints`) into a new checkpoint under
    `out_dir`; returns its step folder (numbered as the newest input)."""
    folders = expand_checkpoints(paths, last)
    metas = [ckpt.read_train_state(f) for f in folders]
    averaged = average_state_dicts([ckpt.load_model_state(f) for f in folders])
    newest = max(range(len(folders)), key=lambda i: metas[i].get("step", 0))
    meta = {k: v for k, v in metas[newest].items() if k in ("config", "model_args", "tokens_seen")}
    meta["averaged_from"] = [str(f) for f in folders]
    return ckpt.save_checkpoint(
        out_dir, int(metas[newest].get("step", 0)), model_state=averaged, optim_state=None, train_state=meta
    )
