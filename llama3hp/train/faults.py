"""Faults on purpose: a seeded injector that breaks a run the way clusters do (TOML section [fault]).

Kinds (each at a step and on a rank; kill, hang and nan strike after the step's backward):
- `kill`: SIGKILL the rank (a lost node; torchrun restarts the job);
- `hang`: SIGSTOP the rank (a hung GPU or NIC; the other ranks' watchdogs take it down);
- `nan`: make one gradient element NaN after backward (transient: only the first execution of the
  step, so the health monitor's rerun comes out clean; `nan_every_run` makes the rerun fail too, a
  reproducible event; a rollback's replay of the step is clean, as after skipping a bad batch);
- `slow`: sleep `slow_ms` in the rank's data section of every step from then on (a straggler);
- `corrupt`: set the high byte of the next token the rank's loader reads, in a private
  copy-on-write map of the shard (the file is never written): the loader's range check fires.

Either one fault (`kind`, `step`, `rank`), or a chaos schedule: `every = K` draws, from `seed`, a
fault about every K steps (K/2 to 3K/2 after the previous), each of a kind drawn from `kinds` on a
drawn rank. A fault fires only in its own launch attempt (torchrun's TORCHELASTIC_RESTART_COUNT):
the single fault in attempt `attempt`, the i-th scheduled one in attempt i. So a restarted job that
replays the steps since its last checkpoint does not meet the same fault again, and the next fault
of the schedule still comes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama3hp.errors import ConfigError

KINDS = ("kill", "hang", "nan", "slow", "corrupt")


@dataclass
class FaultConfig:
    """A fault injected on purpose (testing the recovery paths; off by default)."""

    kind: str = "none"  # none | kill | hang | nan | slow | corrupt
    step: int = 0  # the step (1-based) at which it happens
    rank: int = 0  # on this rank
    attempt: int = 0  # in this launch attempt (torchrun restart count)
    slow_ms: float = 100.0  # kind=slow: delay per step
    nan_every_run: bool = False  # kind=nan: also in the health monitor's rerun (a reproducible NaN)
    every: int = 0  # chaos: a fault about every N steps (0 = off), drawn from `seed`
    kinds: list[str] = field(default_factory=lambda: ["kill"])  # chaos: kinds to draw from
    seed: int = 0  # chaos: seeds the schedule

    def validate(self) -> None:
        for k in [self.kind, *self.kinds]:
            if k not in ("none", *KINDS):
                raise ConfigError(f"fault kind must be one of none, {', '.join(KINDS)}, got '{k}'")
        if self.every < 0 or self.step < 0 or self.rank < 0 or self.attempt < 0:
            raise ConfigError("fault.every, fault.step, fault.rank and fault.attempt must be >= 0")
        if not (math.isfinite(self.slow_ms) and self.slow_ms >= 0):
            raise ConfigError(f"fault.slow_ms must be >= 0, got {self.slow_ms}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none" or self.every > 0


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int


def schedule(cfg: FaultConfig, world: int, total_steps: int) -> list[Fault]:
    """The faults of the run, fault i to fire in launch attempt i (single fault: only `cfg.attempt`)."""
    if cfg.every <= 0:
        if cfg.kind == "none":
            return []
        return [Fault("none", 0, 0)] * cfg.attempt + [Fault(cfg.kind, cfg.step, cfg.rank)]
    rng = random.Random(cfg.seed)
    out: list[Fault] = []
    step = 0
    while True:
        step += rng.randint(max(1, cfg.every // 2), cfg.every + cfg.every // 2)
        if step > total_steps:
            return out
        out.append(Fault(rng.choice(cfg.kinds), step, rng.randrange(world)))


class FaultInjector:
    """Fires this rank's faults of the current attempt (see the module docstring)."""

    def __init__(
        self,
        cfg: FaultConfig,
        *,
        rank: int,
        world: int,
        total_steps: int,
        attempt: int,
        log_path: Path | None = None,
    ):
        self.cfg, self.rank, self.attempt, self.log_path = cfg, rank, attempt, log_path
        plan = schedule(cfg, world, total_steps)
        self.fault = plan[attempt] if attempt < len(plan) else None
        if self.fault is not None and (self.fault.rank != rank or self.fault.kind == "none"):
            self.fault = None
        self.fired = False  # a fault fires once per attempt (a rollback replays the step cleanly)
        self.armed = False  # kind=nan: this execution of the step gets the NaN

    def before_step(self, step: int, datasets: list[Any] = ()) -> None:  # type: ignore[assignment]
        """At step `step` (1-based), in the data section: slow this rank down (a data straggler),
        corrupt its next token read, or arm the fault that strikes after the backward."""
        f = self.fault
        self.armed = False
        if f is None:
            return
        if f.kind == "slow" and step >= f.step:
            time.sleep(self.cfg.slow_ms / 1000.0)
        if step != f.step or self.fired:
            return
        self.fired = True
        self._record(f, step)
        if f.kind == "corrupt":
            for ds in datasets:
                ds.corrupt_next_read()
        elif f.kind in ("nan", "kill", "hang"):
            self.armed = True  # mid-step, after this step's backward

    def _record(self, f: Fault, step: int) -> None:
        """One line on stdout and in <run dir>/faults.jsonl (any rank appends; one short write)."""
        print(f"fault: {f.kind} on rank {self.rank} at step {step} (attempt {self.attempt})", flush=True)
        if self.log_path is not None:
            line = {
                "time": time.time(),
                "kind": f.kind,
                "step": step,
                "rank": self.rank,
                "attempt": self.attempt,
            }
            with contextlib.suppress(OSError), open(self.log_path, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    def after_backward(self, optimizer: torch.optim.Optimizer, rerun: bool) -> None:
        """In the armed step, after its backward (mid-step: a checkpoint started by the previous step
        has had the forward and backward to be written): kill or stop the rank, or make one element
        of the first gradient the optimizer reads NaN (in the health monitor's rerun too with
        nan_every_run)."""
        if not self.armed or self.fault is None:
            return
        if self.fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault.kind == "hang":
            self.armed = False
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if rerun and not self.cfg.nan_every_run:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.numel():
                    p.grad.view(-1)[0] = float("nan")
                    return
