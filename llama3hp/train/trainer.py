"""The training loop: `Trainer(job).run()`.

One path for one process and every layout. `build.py` makes the pieces (device and precision, the
loader, the model as a `StepModel`, AdamW, the run folder); the loop below only ever talks to the
step interface (`llama3hp.parallel.step_model`), so it reads the same whether the model is one
Transformer or this rank's share of a 4D mesh. What remains rank-aware is run-level I/O: rank 0
alone writes config.json, metrics.jsonl, loss.png, the progress bar and the summary; every rank
writes its own checkpoint shards.

One step (`train_step`): the batch shape and learning rate for (step, tokens seen)
(`schedules.py`); `grad_accum` micro-batches from the loader; `model.forward_backward` with the
objective (each micro-batch's loss sum divided by the step's global count of target tokens, so the
accumulated gradient is exactly that of the mean over the whole batch); clip; AdamW. Step, tokens,
loader and RNG states are checkpointed, so `--resume` continues bit-exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from llama3hp.errors import ConfigError
from llama3hp.parallel.distributed import ParallelContext, context_from_mesh, release_mesh, restart_attempt
from llama3hp.parallel.mesh import build_mesh
from llama3hp.posttrain.build import build_objective, build_reference
from llama3hp.posttrain.reward import REWARD_HEAD
from llama3hp.train import build
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.checkpointer import Checkpointer, latest_complete
from llama3hp.train.faults import FaultInjector
from llama3hp.train.health import HealthMonitor, TrainingDiverged, Verdict
from llama3hp.train.metrics import (
    GpuTelemetry,
    MetricsProcessor,
    doc_lengths,
    telemetry_columns,
    telemetry_extra,
)
from llama3hp.train.preemption import StopRequest
from llama3hp.train.profiler import ProfileWindow
from llama3hp.train.schedules import LRSchedule, batch_rows_at, check_table, lr_at, plan_tokens, seq_len_at
from llama3hp.train.stages import has_stage_layouts, stage_parallel
from llama3hp.train.watchdog import StepSections, Watchdog

if TYPE_CHECKING:
    from llama3hp.config import JobConfig

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
ACTIVATION_CHECKPOINTING = ("none", "full")


@dataclass
class TrainingConfig:
    """Optimisation and batch shape (TOML section [training]). Batches are counted in rows of
    `seq_len` tokens."""

    steps: int = 150  # optimizer steps in the run
    micro_batch_rows: int = 2  # rows per forward/backward on each data-parallel rank
    global_batch_rows: int = 2  # rows per optimizer step over all ranks (accumulation is derived)
    seq_len: int = 256  # tokens per row
    lr: float = 3e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay; never on norms or biases
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    warmup_steps: int = 10  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak lr
    anneal_steps: int = 0  # last steps with lr linearly from the floor to 0 (0 = none)
    anneal_tokens: int = 0  # or: last tokens with lr linearly to 0 (0 = none)
    batch_ramp: list[list[int]] = field(default_factory=list)  # [[tokens_seen, global_batch_rows], ...]
    # [[tokens_seen, seq_len], ...]; a third element is the stage's context-parallel degree or "auto"
    seq_len_stages: list[list[Any]] = field(default_factory=list)
    z_loss_scale: float = 0.0  # PaLM z-loss coefficient (0 = off)
    seed: int = 0  # weight init and RNG seed
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "float32" | "bfloat16"
    init_from: str | None = None  # checkpoint dir whose model weights start the run (e.g. `llama3hp import`)
    # "" starts fresh; "auto" continues the latest complete checkpoint of the run's folder if there is
    # one (run_dir, else <runs_root>/<name>: the same folder on every restart), else starts there;
    # a path continues that checkpoint
    resume: str = ""
    # "full": checkpointed blocks keep only their input and recompute their forward in backward
    # (activation memory per block ~34x smaller, ~1/3 more block FLOPs); "none": keep everything.
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 1  # with "full": checkpoint blocks whose layer id is a multiple

    def grad_accum_steps(self, global_rows: int | None = None, dp_size: int = 1) -> int:
        """Micro-batches per rank per optimizer step for a global batch of `global_rows` rows."""
        rows = self.global_batch_rows if global_rows is None else global_rows
        return rows // (self.micro_batch_rows * dp_size)

    def validate(self) -> None:
        """One-line ConfigError for settings that cannot make sense on their own."""
        if self.steps <= 0:
            raise ConfigError(f"training.steps must be positive, got {self.steps}")
        if self.micro_batch_rows <= 0 or self.global_batch_rows <= 0 or self.seq_len <= 0:
            raise ConfigError(
                "training.micro_batch_rows, training.global_batch_rows and training.seq_len must be positive"
            )
        try:
            check_table("training.batch_ramp", self.batch_ramp)
            check_table("training.seq_len_stages", self.seq_len_stages, layouts=True)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"training.warmup_steps ({self.warmup_steps}) must be between 0 and training.steps ({self.steps})"
            )
        if self.anneal_steps < 0 or self.warmup_steps + self.anneal_steps > self.steps:
            raise ConfigError(
                f"training.warmup_steps + training.anneal_steps ({self.warmup_steps} + {self.anneal_steps}) "
                f"exceed training.steps ({self.steps})"
            )
        if self.anneal_tokens < 0:
            raise ConfigError(f"training.anneal_tokens must be >= 0, got {self.anneal_tokens}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"training.lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"training.betas must be two numbers in [0, 1), got {self.betas}")
        if not all(math.isfinite(v) for v in (self.weight_decay, self.eps, self.grad_clip, *self.betas)):
            raise ConfigError(
                "training.weight_decay, eps, grad_clip and betas must be finite numbers "
                f"(NaN would silently turn clipping off), got grad_clip={self.grad_clip}"
            )
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ConfigError(
                "training.weight_decay and training.grad_clip must be >= 0 (grad_clip 0 = off) and training.eps > 0"
            )
        for name, value, choices in (
            ("device", self.device, DEVICES),
            ("dtype", self.dtype, DTYPES),
            ("activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING),
        ):
            if value not in choices:
                raise ConfigError(f"training.{name} must be one of {', '.join(choices)}, got '{value}'")
        if self.activation_checkpointing_every < 1:
            raise ConfigError(
                f"training.activation_checkpointing_every must be >= 1, got {self.activation_checkpointing_every}"
            )


@dataclass
class TrainResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows of this invocation
    wall_s: float = 0.0
    last_checkpoint: Path | None = None
    stopped: bool = False  # stopped on request (a signal or the stop file) after a checkpoint

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]


class Trainer:
    """Builds everything from a JobConfig (`build.py`) and runs the loop (`run`). `resume`: a
    checkpoint path, "auto" or "" (default: training.resume)."""

    def __init__(
        self, job: JobConfig, *, ctx: ParallelContext | None = None, resume: str | Path | None = None
    ):
        self.job, t = job, job.training
        self.ctx = ctx or ParallelContext()
        build.check_layout(job, self.ctx)
        # Folders writable and the checkpoint complete before the minutes of building data and model.
        self.run_dir, ckpt_dir, resume_path = build.prepare_run(job, self.ctx, resume)
        self.step, self.tokens_seen = 0, 0
        if has_stage_layouts(job):  # the mesh of the stage the run starts (or resumes) in
            start = ckpt.read_train_state(resume_path).get("tokens_seen", 0) if resume_path is not None else 0
            self.ctx = self.stage_context(int(start))
        self.device = build.select_device(t.device, self.ctx)
        self.amp_dtype = build.autocast_dtype(t.dtype, self.device)
        build.check_precision(job, self.amp_dtype)
        build.check_fp8(job, self.ctx, self.device)
        build.setup_device(self.device)
        build.seed_everything(t.seed)

        self.tokenizer, self.loader = build.build_loader(job, self.ctx)
        self.model = build.build_model(self.stage_job(), self.device, self.ctx, self.amp_dtype)
        self.fp8_fqns = self.model.fp8_linear_names() if job.fp8.enabled else []
        self.optimizer = build.build_optimizer(self.model, t, self.device)
        # [posttrain]: next-token (pre-training), SFT or DPO, and DPO's frozen reference.
        self.objective = build_objective(job, self.loader)
        self.reference = build_reference(job, self.loader, self.ctx, self.device, self.amp_dtype)
        self.schedule = LRSchedule(
            lr=t.lr,
            total_steps=t.steps,
            warmup_steps=t.warmup_steps,
            min_lr_ratio=t.min_lr_ratio,
            anneal_steps=t.anneal_steps,
            anneal_tokens=t.anneal_tokens,
            # Walking 1M+ steps costs a second or two: only when a token-based anneal needs it.
            total_tokens=plan_tokens(t.steps, t.global_batch_rows, t.seq_len, t.batch_ramp, t.seq_len_stages)
            if t.anneal_tokens
            else 0,
        )
        self.checkpointer = Checkpointer(
            job.checkpoint, ckpt_dir, self.model, self.optimizer, self.ctx.group, self.train_state,
            log=self.log,
        )  # fmt: skip
        self.health = HealthMonitor(job.health, self.ctx.group, self.ctx.rank, self.device)
        self.sections = StepSections(self.device)
        self.telemetry = GpuTelemetry(self.device) if job.metrics.gpu_telemetry else None
        self.on_disk_step: int | None = None  # the step whose state a checkpoint holds exactly
        self.resumed = resume_path is not None
        if resume_path is not None:
            self.resume(resume_path)
        elif t.init_from:
            # A reward model starts from a language model's checkpoint: everything but its scalar head.
            fresh = REWARD_HEAD if job.model.head == "reward" else ()
            state = self.checkpointer.load(Path(t.init_from), with_optimizer=False, fresh=fresh)
            if state["fresh"] and self.ctx.is_leader:
                print(f"{', '.join(state['fresh'])} not in {t.init_from}: initialised afresh", flush=True)
        self.faults = FaultInjector(
            job.fault, rank=self.ctx.rank, world=self.ctx.world_size, total_steps=t.steps, attempt=restart_attempt(),
            log_path=self.run_dir / "faults.jsonl",
        )  # fmt: skip
        self.complete = self.step >= t.steps
        if self.complete and str(resume if resume is not None else t.resume) != "auto":
            raise ConfigError(
                f"checkpoint is at step {self.step}, already >= training.steps={t.steps}: "
                "raise training.steps to continue"
            )

    def log(self, line: str) -> None:
        if self.ctx.is_leader:
            print(line, flush=True)

    def job_store(self) -> Any:
        """The job's store for heartbeats: torchrun's (under this attempt's prefix), else the default
        group's when one was initialised some other way (tests)."""
        if self.ctx.store is not None or self.ctx.group is None:
            return self.ctx.store
        try:
            return dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError):  # no default group, or a torch without the helper
            return None

    # ------------------------------------------------------------------ state
    def train_state(self) -> dict[str, Any]:
        """What a checkpoint stores besides the weights and AdamW state (JSON)."""
        return {
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "schedule": {
                "lr": lr_at(self.schedule, self.step, self.tokens_seen),
                **dataclasses.asdict(self.schedule),
            },
            "config": self.job.to_dict(),
            "model_args": dataclasses.asdict(self.job.model),
            "run_dir": str(self.run_dir),
            "parallel": dataclasses.asdict(self.ctx.mesh.dims) if self.ctx.mesh is not None else None,
            "health": self.health.state_dict(),
        }

    def resume(self, path: Path, *, restore_health: bool = True) -> None:
        """Continue a checkpoint of any layout: weights, AdamW, counters, loader position, health and RNG."""
        state = self.checkpointer.load(path, verify=False)  # verified in prepare_run
        if state.get("kind") != "full":  # weights only (import / average): a fresh run from them
            return
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        if restore_health and "health" in state:
            self.health.load_state_dict(state["health"])
        rng = ckpt.read_rng_state(path)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.on_disk_step = self.step

    # ------------------------------------------------------------------ the step
    def train_step(self) -> tuple[dict[str, Any], list[int], Verdict]:
        """One optimizer step (unless the health monitor says otherwise); returns its metrics row
        (without timing), its document lengths and the health verdict."""
        t, step = self.job.training, self.step + 1
        rows = batch_rows_at(t.batch_ramp, self.tokens_seen, t.global_batch_rows)
        seq_len = seq_len_at(t.seq_len_stages, self.tokens_seen, t.seq_len)
        accum = t.grad_accum_steps(rows, self.ctx.dp_size)
        with self.sections.section("data"):
            self.faults.before_step(step, self.loader.datasets)
            batches = [
                self.loader.next_batch(t.micro_batch_rows, seq_len).to(self.device) for _ in range(accum)
            ]
            if self.reference is not None:  # DPO: the reference's log-probabilities of each pair
                self.reference.annotate(batches)

        def compute(rerun: bool) -> tuple[Any, torch.Tensor]:
            with self.sections.section("forward_backward"):
                result = self.model.forward_backward(batches, self.objective)
                self.faults.after_backward(self.optimizer, rerun)
                return result, self.model.clip_grad_norm_(t.grad_clip)

        extra = {"stop": float(self.stop.requested)}
        if self.telemetry is not None:
            extra.update(telemetry_extra(self.telemetry.read()))
        with self.sections.section("sync"):  # the one all-reduce of the health check (and any rerun)
            result, grad_norm, verdict = self.health.run_step(step, compute, self.model.zero_grad, extra)
        lr = lr_at(self.schedule, self.step, self.tokens_seen)
        with self.sections.section("optimizer"):
            if verdict.action == "step":
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.model.after_optimizer_step()
            self.model.zero_grad()

        tokens = rows * seq_len
        self.step = step
        self.tokens_seen += tokens
        row = {
            "step": self.step,
            "loss": result.loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "tokens": tokens,
            "tokens_seen": self.tokens_seen,
            "global_batch_rows": rows,
            "seq_len": seq_len,
            "grad_accum": accum,
            **{k: v.item() for k, v in result.stats.items()},
            **verdict.row(),
            **telemetry_columns(verdict.synced),
        }
        return row, [n for b in batches for n in doc_lengths(b.cu_seqlens)], verdict

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        job, t, lead = self.job, self.job.training, self.ctx.is_leader
        result = TrainResult(run_dir=self.run_dir)
        if self.complete:  # training.resume=auto after the last step: nothing left to do
            self.log(f"run {self.run_dir} is already complete (step {self.step} of {t.steps})")
            return result
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            job.dump(self.run_dir / "config.json")
        metrics = MetricsProcessor(
            job.metrics, self.run_dir, self.device, job.model, leader=lead, world_size=self.ctx.world_size,
            total_steps=t.steps, first_step=self.step, fp8_recipe=job.fp8.recipe if job.fp8.enabled else None,
            fp8_fqns=self.fp8_fqns,
        )  # fmt: skip
        if self.resumed:
            metrics.event("resume", self.step, f"resumed at step {self.step} (attempt {restart_attempt()})")
        profiler = ProfileWindow(job.metrics.profile_steps, self.run_dir, self.device, enabled=lead)
        straggler_every = job.watchdog.straggler_interval
        self.stop = StopRequest(self.run_dir, watch_file=lead)
        if lead:
            self.stop.clear_stale()  # left by the job this one was requeued from
        self.watchdog = Watchdog(
            job.watchdog, rank=self.ctx.rank, world=self.ctx.world_size, store=self.job_store(),
            sections=self.sections, dump_dir=self.run_dir / "hangs", attempt=restart_attempt(),
        )  # fmt: skip
        start = time.perf_counter()
        try:
            while self.step < t.steps:
                self.maybe_replan(metrics)
                profiler.step_begins(self.step)
                with self.watchdog.watch(f"step {self.step + 1}", is_step=True):
                    t0 = time.perf_counter()
                    row, doc_lens, verdict = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    step_time = time.perf_counter() - t0
                self.sections.end_step()
                if straggler_every and self.step % straggler_every == 0:
                    row.update(self.report_stragglers(metrics))
                if verdict.message:
                    metrics.event(
                        verdict.event or "health", self.step, verdict.message, action=verdict.action
                    )
                if verdict.action == "abort":
                    metrics.log(row, step_time, doc_lens)
                    raise TrainingDiverged(verdict.message)
                if verdict.action == "rollback":
                    self.rollback(metrics)
                    continue
                stop = verdict.synced.get("stop", 0.0) > 0
                with self.watchdog.watch(f"checkpoint of step {self.step}"):
                    blocked = self.checkpointer.maybe_save(self.step, last=self.step == t.steps or stop)
                if blocked is not None:
                    row["checkpoint_block_s"] = blocked
                    self.on_disk_step = self.step
                metrics.log(row, step_time, doc_lens)
                profiler.step_ended(self.step)
                if stop:
                    metrics.event(
                        "stop", self.step, f"stopped on request at step {self.step} after a checkpoint"
                    )
                    result.stopped = True
                    break
            with self.watchdog.watch("the last checkpoint"):
                self.checkpointer.wait()
            result.last_checkpoint = self.checkpointer.last
        finally:
            self.watchdog.close()
            self.stop.close()
            metrics.close()
            profiler.close(self.step)
        result.rows, result.wall_s = metrics.rows, time.perf_counter() - start
        metrics.finish(result.wall_s)
        return result

    # ------------------------------------------------------------------ what the loop calls on events
    def report_stragglers(self, metrics: MetricsProcessor) -> dict[str, Any]:
        """Every rank's section times compared (a collective every straggler_interval steps)."""
        cols = self.sections.gather(self.ctx.group, self.job.watchdog.straggler_factor)
        if cols["stragglers"]:
            slow = ", ".join(
                f"rank {s['rank']} {s['section']} {s['s']:.3f} s (median {s['median_s']:.3f} s)"
                for s in cols["stragglers"]
            )
            metrics.event(
                "straggler",
                self.step,
                f"stragglers over the last steps: {slow}",
                stragglers=cols["stragglers"],
            )
        return cols

    def rollback(self, metrics: MetricsProcessor) -> None:
        """Reload the last checkpoint and skip the data window that led to the bad step: the loader
        keeps its position, everything else returns to the checkpoint."""
        self.checkpointer.wait()
        path = latest_complete(self.checkpointer.folder)
        if path is None:
            raise TrainingDiverged(
                f"step {self.step}: rollback asked for, but there is no checkpoint yet: aborting"
            )
        bad_step, window_end = self.step, self.loader.state_dict()
        with self.watchdog.watch(f"rollback to {path.name}"):
            self.resume(path, restore_health=False)
            self.loader.load_state_dict(window_end)
        metrics.rewind(self.step)
        metrics.event(
            "rollback",
            bad_step,
            f"rolled back to {path.name}; the data of steps {self.step + 1}..{bad_step} is skipped",
        )

    def stage_job(self) -> JobConfig:
        """The job with the [parallel] layout of the current mesh (a stage may change cp and dp)."""
        if self.ctx.mesh is None or not has_stage_layouts(self.job):
            return self.job
        dims = self.ctx.mesh.dims
        return dataclasses.replace(
            self.job, parallel=dataclasses.replace(self.job.parallel, cp=dims.cp, dp=dims.dp)
        )

    def stage_context(self, tokens_seen: int) -> ParallelContext:
        """This rank's context under the layout of the stage at `tokens_seen` (the current one if it
        already is; a new mesh over the same ranks otherwise, the old groups released)."""
        if self.ctx.mesh is None or not has_stage_layouts(self.job):
            return self.ctx
        cfg = stage_parallel(self.job, tokens_seen, self.ctx.world_size)
        if cfg.cp == self.ctx.mesh.dims.cp:
            return self.ctx
        release_mesh(self.ctx.mesh)
        return context_from_mesh(build_mesh(cfg), self.ctx.store)

    def maybe_replan(self, metrics: MetricsProcessor) -> None:
        """At a stage boundary whose layout differs: checkpoint, rebuild mesh, model, AdamW and
        checkpointer in-process, and reload through DCP (see stages.py)."""
        if self.ctx.mesh is None or not has_stage_layouts(self.job):
            return
        want = stage_parallel(self.job, self.tokens_seen, self.ctx.world_size)
        if want.cp == self.ctx.mesh.dims.cp:
            return
        old = self.ctx.mesh.dims
        with self.watchdog.watch(f"re-plan at step {self.step}"):
            if self.on_disk_step != self.step:
                self.checkpointer.save(self.step, wait=True)
            self.checkpointer.wait()
            path = self.checkpointer.last
            assert path is not None
            del self.model, self.optimizer
            self.checkpointer.model = self.checkpointer.optimizer = None  # type: ignore[assignment]
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.ctx = self.stage_context(self.tokens_seen)
            self.loader.set_data_parallel(self.ctx.dp_rank, self.ctx.dp_size)
            self.model = build.build_model(self.stage_job(), self.device, self.ctx, self.amp_dtype)
            self.optimizer = build.build_optimizer(self.model, self.job.training, self.device)
            self.checkpointer = Checkpointer(
                self.job.checkpoint, self.checkpointer.folder, self.model, self.optimizer, self.ctx.group,
                self.train_state, save_group=self.checkpointer.save_group, log=self.log,
            )  # fmt: skip
            self.health.group = self.ctx.group
            self.resume(path)
        assert self.ctx.mesh is not None
        new = self.ctx.mesh.dims
        metrics.event(
            "replan", self.step,
            f"stage boundary at {self.tokens_seen:,} tokens: mesh TP{old.tp} CP{old.cp} PP{old.pp} DP{old.dp} -> "
            f"TP{new.tp} CP{new.cp} PP{new.pp} DP{new.dp}, resharded from {path.name}",
        )  # fmt: skip


def train(
    job: JobConfig, *, resume: str | Path | None = None, ctx: ParallelContext | None = None
) -> TrainResult:
    """Build a Trainer from `job` and run it."""
    return Trainer(job, ctx=ctx, resume=resume).run()
