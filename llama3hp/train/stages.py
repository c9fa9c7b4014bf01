"""The long-context curriculum in one launch: each `training.seq_len_stages` entry may carry its own
context-parallel degree, and the trainer re-plans its mesh in-process at the stage boundary.

    seq_len_stages = [[252_000_000, 8192], [14_800_000_000_000, 16384, "auto"], ..., [T, 131072, 16]]

A stage's layout is the `[parallel]` section with `cp` replaced and `dp` derived from the same world
size (CP up, DP down; TP and PP stay): an int, or "auto", the smallest CP degree whose predicted
memory per GPU (`llama3hp plan`'s model, `parallel/plan.py`) fits the GPU. A stage without a third
element runs `parallel.cp`.

At a boundary `Trainer.replan` checkpoints (unless the state is already on disk), tears the old
mesh and model down, builds the new mesh over the same ranks, the model, AdamW and the
checkpointer on it, and loads the checkpoint: DCP reshards every tensor to the new layout, and the
loader's state is global (rows served, per dataset), so its position is exact and only its
data-parallel slice changes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llama3hp.errors import ConfigError
from llama3hp.parallel.mesh import ParallelConfig, resolve_dims, validate_layout
from llama3hp.parallel.parallelize import check_schedule
from llama3hp.train.schedules import batch_rows_at, seq_len_at, stage_cp_at

if TYPE_CHECKING:
    from llama3hp.config import JobConfig


def has_stage_layouts(job: JobConfig) -> bool:
    return any(len(s) > 2 for s in job.training.seq_len_stages)


def auto_cp(job: JobConfig, world: int, seq_len: int, rows: int, hbm_gib: float | None = None) -> int:
    """The smallest CP degree (dividing world / (tp*pp)) whose layout the mesh accepts and whose
    predicted memory per GPU fits `hbm_gib` (the plan's H100, 80 GiB, by default)."""
    from llama3hp.parallel.plan import Hardware, plan

    p, t = job.parallel, job.training
    hw = Hardware() if hbm_gib is None else Hardware(hbm_gib=hbm_gib)
    rest = world // (p.tp * p.pp)
    tried = []
    for cp in (c for c in range(1, rest + 1) if rest % c == 0):
        dp = rest // cp
        if rows % (t.micro_batch_rows * dp):
            continue
        try:
            report = plan(
                job.model_preset, p.tp, cp, p.pp, dp, seq_len, rows, micro_rows=t.micro_batch_rows,
                virtual=p.pp_virtual_stages if p.pp_schedule == "interleaved" else 1, zero_stage=p.zero_stage,
                checkpointing=t.activation_checkpointing, checkpoint_every=t.activation_checkpointing_every,
                zero3_gather_dtype=p.zero3_gather_dtype, hw=hw, args=job.model,
            )  # fmt: skip
        except (ValueError, RuntimeError):
            continue  # this CP degree cannot split the row, or the pipeline cannot run its micro-batches
        tried.append(f"cp={cp}: {report.mem_total_gib:.0f} GiB")
        if report.mem_total_gib <= hw.hbm_gib:
            return cp
    raise ConfigError(
        f"no context-parallel degree fits seq_len {seq_len} in {hw.hbm_gib:.0f} GiB per GPU on {world} ranks "
        f"({', '.join(tried) or 'none splits the row'}): set the stage's cp explicitly or raise tp/pp"
    )


def stage_parallel(job: JobConfig, tokens_seen: int, world: int) -> ParallelConfig:
    """The `[parallel]` layout of the stage in effect after `tokens_seen` tokens on `world` ranks."""
    if not has_stage_layouts(job):
        return job.parallel
    t = job.training
    want = stage_cp_at(t.seq_len_stages, tokens_seen, job.parallel.cp)
    if want == "auto":
        seq = seq_len_at(t.seq_len_stages, tokens_seen, t.seq_len)
        rows = batch_rows_at(t.batch_ramp, tokens_seen, t.global_batch_rows)
        want = auto_cp(job, world, seq, rows)
    return dataclasses.replace(job.parallel, cp=int(want), dp=-1)


def check_stages(job: JobConfig, world: int) -> None:
    """One-line ConfigError unless every stage's layout splits the model, its rows and its sequence
    length on `world` ranks (checked at every threshold of the batch ramp and the stages)."""
    t = job.training
    points = sorted({0, *(r[0] for r in t.batch_ramp), *(s[0] for s in t.seq_len_stages)})
    for tokens in points:
        cfg = stage_parallel(job, tokens, world)
        seq = seq_len_at(t.seq_len_stages, tokens, t.seq_len)
        rows = batch_rows_at(t.batch_ramp, tokens, t.global_batch_rows)
        try:
            dims = resolve_dims(cfg, world)
            validate_layout(cfg, dims, job.model, seq)
        except ValueError as e:
            raise ConfigError(f"at {tokens:,} tokens (seq_len {seq}, cp {cfg.cp}): {e}") from None
        if rows % (t.micro_batch_rows * dims.dp):
            raise ConfigError(
                f"at {tokens:,} tokens the global batch of {rows} rows is not divisible by micro_batch_rows x dp "
                f"= {t.micro_batch_rows} x {dims.dp} (cp {cfg.cp}): change the batch ramp or the stage's cp"
            )
        if dims.pp > 1:
            virtual = cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved" else 1
            try:
                check_schedule(cfg.pp_schedule, dims.pp, virtual, rows // (t.micro_batch_rows * dims.dp))
            except ValueError as e:
                raise ConfigError(f"at {tokens:,} tokens (cp {cfg.cp}, dp {dims.dp}): {e}") from None
