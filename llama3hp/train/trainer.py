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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llama3hp.errors import ConfigError
from llama3hp.parallel.distributed import ParallelContext
from llama3hp.train import build
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.checkpointer import Checkpointer
from llama3hp.train.metrics import MetricsProcessor, doc_lengths
from llama3hp.train.objectives import NextTokenLoss
from llama3hp.train.profiler import ProfileWindow
from llama3hp.train.schedules import LRSchedule, batch_rows_at, check_table, lr_at, plan_tokens, seq_len_at

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
    seq_len_stages: list[list[int]] = field(default_factory=list)  # [[tokens_seen, seq_len], ...]
    z_loss_scale: float = 0.0  # PaLM z-loss coefficient (0 = off)
    seed: int = 0  # weight init and RNG seed
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "float32" | "bfloat16"
    init_from: str | None = None  # checkpoint dir whose model weights start the run (e.g. `llama3hp import`)
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
            check_table("training.seq_len_stages", self.seq_len_stages)
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

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]


class Trainer:
    """Builds everything from a JobConfig (`build.py`) and runs the loop (`run`)."""

    def __init__(
        self, job: JobConfig, *, ctx: ParallelContext | None = None, resume: str | Path | None = None
    ):
        self.job, t = job, job.training
        self.ctx = ctx or ParallelContext()
        build.check_layout(job, self.ctx)
        # Fail on a bad checkpoint path before the minutes of building data and model.
        resume_path = ckpt.resolve_checkpoint(resume) if resume else None
        if resume_path is not None:
            ckpt.verify_checkpoint_shared(resume_path, self.ctx.group)
        self.device = build.select_device(t.device, self.ctx)
        self.amp_dtype = build.autocast_dtype(t.dtype, self.device)
        build.check_precision(job, self.amp_dtype)
        build.check_fp8(job, self.ctx, self.device)
        build.setup_device(self.device)
        build.seed_everything(t.seed)

        self.tokenizer, self.loader = build.build_loader(job, self.ctx)
        self.model = build.build_model(job, self.device, self.ctx, self.amp_dtype)
        self.fp8_fqns = self.model.fp8_linear_names() if job.fp8.enabled else []
        self.optimizer = build.build_optimizer(self.model, t, self.device)
        self.objective = NextTokenLoss(z_loss_scale=t.z_loss_scale)
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
        self.step, self.tokens_seen = 0, 0
        run_dir = build.pick_run_dir(job, resume_path) if self.ctx.is_leader else None
        self.run_dir = Path(self.ctx.broadcast(str(run_dir) if run_dir is not None else None))
        ckpt_dir = Path(job.checkpoint.dir) if job.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpointer = Checkpointer(
            job.checkpoint, ckpt_dir, self.model, self.optimizer, self.ctx.group, self.train_state
        )
        if resume_path is not None:
            self.resume(resume_path)
        elif t.init_from:
            self.checkpointer.load(Path(t.init_from), with_optimizer=False)
        if self.step >= t.steps:
            raise ConfigError(
                f"checkpoint is at step {self.step}, already >= training.steps={t.steps}: "
                "raise training.steps to continue"
            )

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
        }

    def resume(self, path: Path) -> None:
        """Continue a checkpoint of any layout: weights, AdamW, counters, loader position and RNG."""
        state = self.checkpointer.load(path, verify=False)  # verified in __init__
        if state.get("kind") != "full":  # weights only (import / average): a fresh run from them
            return
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        rng = ckpt.read_rng_state(path)
        if rng is not None:
            ckpt.set_rng_state(rng)

    # ------------------------------------------------------------------ the step
    def train_step(self) -> tuple[dict[str, Any], list[int]]:
        """One optimizer step; returns its metrics row (without timing) and its document lengths."""
        t = self.job.training
        rows = batch_rows_at(t.batch_ramp, self.tokens_seen, t.global_batch_rows)
        seq_len = seq_len_at(t.seq_len_stages, self.tokens_seen, t.seq_len)
        accum = t.grad_accum_steps(rows, self.ctx.dp_size)
        batches = [self.loader.next_batch(t.micro_batch_rows, seq_len).to(self.device) for _ in range(accum)]

        result = self.model.forward_backward(batches, self.objective)
        grad_norm = self.model.clip_grad_norm_(t.grad_clip)
        lr = lr_at(self.schedule, self.step, self.tokens_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.model.after_optimizer_step()
        self.model.zero_grad()

        tokens = rows * seq_len
        self.step += 1
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
        }
        return row, [n for b in batches for n in doc_lengths(b.cu_seqlens)]

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        job, t, lead = self.job, self.job.training, self.ctx.is_leader
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            job.dump(self.run_dir / "config.json")
        metrics = MetricsProcessor(
            job.metrics, self.run_dir, self.device, job.model, leader=lead, world_size=self.ctx.world_size,
            total_steps=t.steps, first_step=self.step, fp8_recipe=job.fp8.recipe if job.fp8.enabled else None,
            fp8_fqns=self.fp8_fqns,
        )  # fmt: skip
        profiler = ProfileWindow(job.metrics.profile_steps, self.run_dir, self.device, enabled=lead)
        result = TrainResult(run_dir=self.run_dir)
        start = time.perf_counter()
        try:
            while self.step < t.steps:
                profiler.step_begins(self.step)
                t0 = time.perf_counter()
                row, doc_lens = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                metrics.log(row, time.perf_counter() - t0, doc_lens)
                profiler.step_ended(self.step)
                if self.checkpointer.maybe_save(self.step, last=self.step == t.steps):
                    result.last_checkpoint = self.checkpointer.last
        finally:
            metrics.close()
            profiler.close(self.step)
        result.rows, result.wall_s = metrics.rows, time.perf_counter() - start
        metrics.finish(result.wall_s)
        return result


def train(
    job: JobConfig, *, resume: str | Path | None = None, ctx: ParallelContext | None = None
) -> TrainResult:
    """Build a Trainer from `job` and run it."""
    return Trainer(job, ctx=ctx, resume=resume).run()
