"""A run's checkpoints: when to save (`maybe_save`), and saving and resuming the model, the optimizer
and the trainer's state through the one checkpoint path of `llama3hp.train.checkpoint` (the same on
one process and on any mesh: every rank writes its shards under global names and shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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

    def validate(self) -> None:
        if self.interval < 0 or self.keep < 0:
            raise ConfigError("checkpoint.interval and checkpoint.keep must be >= 0")


class Checkpointer:
    """Saves and loads one run's checkpoints. `train_state()` gives the JSON state the trainer adds
    to each checkpoint (step counters, loader position, schedule, config)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        folder: Path,
        model: StepModel,
        optimizer: torch.optim.Optimizer,
        group: dist.ProcessGroup | None,
        train_state: Callable[[], dict[str, Any]],
    ):
        self.cfg, self.folder, self.model, self.optimizer = cfg, folder, model, optimizer
        self.group, self.train_state = group, train_state
        self.last: Path | None = None

    def due(self, step: int, *, last: bool) -> bool:
        c = self.cfg
        return c.enabled and bool((c.interval and step % c.interval == 0) or (c.save_final and last))

    def maybe_save(self, step: int, *, last: bool) -> Path | None:
        """Save step `step` when the interval or the end of the run says so."""
        return self.save(step) if self.due(step, last=last) else None

    def save(self, step: int) -> Path:
        self.last = ckpt.save_model_checkpoint(
            self.folder, step, self.model, self.optimizer, train_state=self.train_state(),
            rng=ckpt.rng_state(), keep=self.cfg.keep, group=self.group,
        )  # fmt: skip
        return self.last

    def load(
        self, path: Path, *, with_optimizer: bool = True, verify: bool = True, fresh: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Weights (and the optimizer state, when stored and asked for) of a checkpoint saved under
        any layout into this rank's model; returns its train state. `fresh`: parameters the
        checkpoint may lack (they keep their initial values)."""
        optimizer = self.optimizer if with_optimizer else None
        return ckpt.load_checkpoint(path, self.model, optimizer, group=self.group, verify=verify, fresh=fresh)


def find_latest_checkpoint(cfg: CheckpointConfig, runs_root: str, name: str) -> Path:
    """For a bare --resume: checkpoint.dir if set, else the newest run of this name with a checkpoint."""
    if cfg.dir:
        return ckpt.resolve_checkpoint(cfg.dir)
    runs = sorted(
        Path(runs_root).glob(f"{name}-*/checkpoints/{ckpt.LATEST}"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ckpt.CheckpointError(
            f"nothing to resume: no checkpoint under {runs_root}/{name}-*/checkpoints; pass --resume PATH"
        )
    return ckpt.resolve_checkpoint(runs[-1].parent)
