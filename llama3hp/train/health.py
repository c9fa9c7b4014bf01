"""Numerical health of every step: NaN/Inf and loss spikes, agreed by every rank, and what to do.

`HealthMonitor.run_step(step, compute, zero_grad)` wraps the forward/backward of one step:

1. `compute()` runs forward, backward and clipping and returns (StepStats, grad norm);
2. ONE all-reduce (MAX over the layout's ranks) agrees on what the ranks saw: whether the loss or
   the gradient norm was NaN/Inf anywhere and on which rank (the lowest), the loss (spikes are
   judged on the agreed value), and whatever the other components add to the same message (a stop
   request, each rank's GPU telemetry as max and -min);
3. a bad step (non-finite, or a spike: loss > `spike_factor` x the median of the last
   `spike_window` accepted losses, once `spike_warmup` of them are known) is first re-run once,
   from the same weights on the same batches, as Megatron's rerun state machine does: finite and
   calm this time means a transient fault (a flipped bit, a bad chip), and the rerun's gradients
   are used; bad again means a reproducible event, handled by its policy:
   - `skip`: no optimizer update on any rank; the batch is consumed and the step logged;
   - `rollback`: the trainer reloads the last checkpoint and skips the data window that led here;
   - `abort`: one line naming the step, the rank and the value; exit code 2;
   - `warn` (spikes only): logged, the update applied.
   `max_bad_steps` bad steps in a row (or `max_rollbacks` rollbacks in a run) abort: a run that keeps
   diverging is stopped instead of skipping forever.

The monitor's state (recent losses, counters) is part of the checkpoint, so a resumed run judges
its steps exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from llama3hp.errors import ConfigError, UserError

POLICIES = ("skip", "rollback", "abort")
SPIKE_POLICIES = ("warn", *POLICIES)


class TrainingDiverged(UserError, RuntimeError):
    """A reproducible numerical event under the `abort` policy (or too many in a row); one line."""


@dataclass
class HealthConfig:
    """What a bad step is and what to do about it (TOML section [health])."""

    nan_policy: str = "skip"  # a NaN/Inf loss or gradient norm: skip | rollback | abort
    spike_policy: str = "skip"  # a loss spike: warn | skip | rollback | abort
    spike_factor: float = 2.0  # a spike: loss > factor x the running median (0 = no spike detection)
    spike_window: int = 50  # accepted losses in the running median
    spike_warmup: int = 20  # accepted losses needed before spikes are judged
    rerun: bool = True  # re-run a bad step once to tell a transient fault from a reproducible one
    max_bad_steps: int = 10  # abort after this many reproducible bad steps in a row
    max_rollbacks: int = 3  # abort after this many rollbacks in one run

    def validate(self) -> None:
        if self.nan_policy not in POLICIES:
            raise ConfigError(
                f"health.nan_policy must be one of {', '.join(POLICIES)}, got '{self.nan_policy}'"
            )
        if self.spike_policy not in SPIKE_POLICIES:
            raise ConfigError(
                f"health.spike_policy must be one of {', '.join(SPIKE_POLICIES)}, got '{self.spike_policy}'"
            )
        if not (math.isfinite(self.spike_factor) and (self.spike_factor == 0 or self.spike_factor > 1)):
            raise ConfigError(f"health.spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        if self.spike_window < 1 or self.spike_warmup < 1 or self.max_bad_steps < 1 or self.max_rollbacks < 0:
            raise ConfigError(
                "health.spike_window, spike_warmup and max_bad_steps must be >= 1 and max_rollbacks >= 0"
            )


@dataclass
class Verdict:
    """What the monitor decided about one step."""

    action: str = "step"  # "step" (apply the update) | "skip" | "rollback" | "abort"
    event: str | None = None  # None | "nonfinite" | "spike"
    rerun: str | None = None  # None | "transient" | "reproducible" (the step was computed twice)
    message: str = ""
    synced: dict[str, float] = field(default_factory=dict)  # the other components' agreed values

    def row(self) -> dict[str, Any]:
        """The metrics-row columns of this verdict (none for a plain healthy step)."""
        out: dict[str, Any] = {}
        if self.event is not None:
            out["health_event"] = self.event
        if self.rerun is not None:
            out["rerun"] = self.rerun
        if self.action != "step":
            out["health_action"] = self.action
        return out


@dataclass
class _Check:
    nonfinite: bool
    bad_rank: int
    loss: float
    grad_norm: float
    spike: bool
    synced: dict[str, float]


class HealthMonitor:
    """One rank's view of the run's numerical health; every decision is the same on every rank."""

    def __init__(self, cfg: HealthConfig, group: dist.ProcessGroup | None, rank: int, device: torch.device):
        self.cfg, self.group, self.rank, self.device = cfg, group, rank, device
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.bad_in_a_row = 0
        self.rollbacks = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "bad_in_a_row": self.bad_in_a_row, "rollbacks": self.rollbacks}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.losses = deque(sd.get("losses", []), maxlen=self.cfg.spike_window)
        self.bad_in_a_row = int(sd.get("bad_in_a_row", 0))
        self.rollbacks = int(sd.get("rollbacks", 0))

    # ------------------------------------------------------------------ the agreement
    def agree(self, values: dict[str, float]) -> dict[str, float]:
        """The MAX of each value over the layout's ranks (one all-reduce; the values unchanged on one
        process). Every rank must pass the same keys."""
        if self.group is None or not values:
            return dict(values)
        dev = self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return dict(zip(values, t.tolist()))

    def _check(self, loss_t: torch.Tensor, norm_t: torch.Tensor, extra: dict[str, float]) -> _Check:
        loss, norm = float(loss_t), float(norm_t)
        nonfinite = not (math.isfinite(loss) and math.isfinite(norm))
        world = dist.get_world_size(self.group) if self.group is not None else 1
        mine = {
            "_nonfinite": float(nonfinite),
            "_first_bad": float(world - self.rank) if nonfinite else 0.0,  # MAX picks the lowest rank
            "_loss": loss if math.isfinite(loss) else -1.0,
            **extra,
        }
        got = self.agree(mine)
        bad = got.pop("_nonfinite") > 0
        bad_rank = world - int(got.pop("_first_bad")) if bad else -1
        agreed_loss = got.pop("_loss")
        spike = not bad and self._is_spike(agreed_loss)
        return _Check(bad, bad_rank, loss if bad else agreed_loss, norm, spike, got)

    def _is_spike(self, loss: float) -> bool:
        c = self.cfg
        if c.spike_factor == 0 or len(self.losses) < c.spike_warmup:
            return False
        return loss > c.spike_factor * statistics.median(self.losses)

    # ------------------------------------------------------------------ one step
    def run_step(
        self,
        step: int,
        compute: Callable[[bool], tuple[Any, torch.Tensor]],
        zero_grad: Callable[[], None],
        extra: dict[str, float] | None = None,
    ) -> tuple[Any, torch.Tensor, Verdict]:
        """(stats, grad norm, verdict) of step `step`; `compute(rerun)` runs its forward/backward and
        clipping (`rerun` True the second time). `extra`: values to agree on (MAX) in the same message."""
        stats, norm = compute(False)
        check = self._check(stats.loss, norm, dict(extra or {}))
        rerun = None
        if (check.nonfinite or check.spike) and self.cfg.rerun:
            zero_grad()
            stats, norm = compute(True)
            again = self._check(stats.loss, norm, dict(extra or {}))
            rerun = "reproducible" if (again.nonfinite or again.spike) else "transient"
            check = again
        verdict = self._decide(step, check)
        verdict.rerun = rerun
        verdict.synced = check.synced
        return stats, norm, verdict

    def _decide(self, step: int, c: _Check) -> Verdict:
        cfg = self.cfg
        if not (c.nonfinite or c.spike):
            self.losses.append(c.loss)
            self.bad_in_a_row = 0
            return Verdict()
        event = "nonfinite" if c.nonfinite else "spike"
        policy = cfg.nan_policy if c.nonfinite else cfg.spike_policy
        if c.nonfinite:
            what = f"non-finite loss {c.loss} / grad norm {c.grad_norm} (first seen on rank {c.bad_rank})"
        else:
            median = statistics.median(self.losses)
            what = f"loss spike {c.loss:.4f} > {cfg.spike_factor:g} x running median {median:.4f} (all ranks)"
        if policy == "warn":
            self.losses.append(c.loss)
            return Verdict("step", event, message=f"step {step}: {what}; applied (health.spike_policy=warn)")
        self.bad_in_a_row += 1
        if policy == "rollback":
            self.rollbacks += 1
        if policy == "abort":
            hint = "lower training.lr, or set health.nan_policy / spike_policy to skip or rollback"
            return Verdict("abort", event, message=f"step {step}: {what}: aborting (policy abort); {hint}")
        if self.bad_in_a_row >= cfg.max_bad_steps:
            return Verdict(
                "abort", event,
                message=f"step {step}: {what}, {self.bad_in_a_row} bad steps in a row (health.max_bad_steps): "
                "the run is diverging; lower training.lr or resume from an earlier checkpoint",
            )  # fmt: skip
        if policy == "rollback" and self.rollbacks > cfg.max_rollbacks:
            return Verdict(
                "abort", event,
                message=f"step {step}: {what}, after {cfg.max_rollbacks} rollbacks (health.max_rollbacks): "
                "the run keeps diverging; lower training.lr",
            )  # fmt: skip
        verb = (
            "skipped (no update on any rank)" if policy == "skip" else "rolling back to the last checkpoint"
        )
        return Verdict(policy, event, message=f"step {step}: {what}: {verb}")
