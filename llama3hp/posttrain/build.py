"""What the trainer (and `llama3hp evaluate`) build from [posttrain]: the objective, and for DPO its
reference (`reference.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llama3hp.errors import ConfigError
from llama3hp.parallel.distributed import ParallelContext
from llama3hp.parallel.step_model import StepModel
from llama3hp.posttrain.dpo import DPOLoss
from llama3hp.posttrain.reference import (
    CoResidentReference,
    PrecomputedReference,
    Reference,
    ReferenceKey,
    checkpoint_sha256,
    compute_values,
    data_sha256,
    write_values,
)
from llama3hp.train.objectives import MaskedNextTokenLoss, NextTokenLoss, Objective

if TYPE_CHECKING:
    from llama3hp.config import JobConfig

DATA_KIND = {"sft": "sft", "dpo": "preference"}


def data_kind(loader: Any) -> str:
    return getattr(loader, "kind", "pretrain")


def build_objective(job: JobConfig, loader: Any) -> Objective:
    """The objective of job.posttrain, checked against the kind of data the loader reads."""
    p, t = job.posttrain, job.training
    kind = data_kind(loader)
    want = DATA_KIND.get(p.objective, "pretrain")
    if p.objective != "next_token" and kind != want:
        raise ConfigError(
            f"posttrain.objective={p.objective} needs data prepared with --format {want}, but data.datasets "
            f"holds {kind} data: prepare it (`llama3hp prepare --format {want}`) or change the objective"
        )
    if p.objective == "sft":
        return MaskedNextTokenLoss(z_loss_scale=t.z_loss_scale)
    if p.objective == "dpo":
        return DPOLoss(p.beta, p.alpha, p.mask_format_tokens)
    return NextTokenLoss(z_loss_scale=t.z_loss_scale)


def reference_checkpoint(job: JobConfig) -> str:
    path = job.posttrain.reference or job.training.init_from
    if not path:
        raise ConfigError(
            "posttrain.objective=dpo needs a reference model: set posttrain.reference (or training.init_from, "
            "the policy's starting checkpoint, which is then also the reference)"
        )
    return path


def load_frozen(
    job: JobConfig, path: str, device: torch.device, ctx: ParallelContext, amp_dtype
) -> StepModel:
    """A model built exactly as the policy (same layout) with the weights of checkpoint `path`; a
    checkpoint of another architecture or vocabulary is a one-line CheckpointError."""
    from llama3hp.train import build
    from llama3hp.train import checkpoint as ckpt

    model = build.build_model(job, device, ctx, amp_dtype)
    ckpt.load_checkpoint(path, model, None, group=ctx.group)
    return model


def holds_head(ctx: ParallelContext) -> bool:
    """Whether this rank runs the last pipeline stage (where objectives run)."""
    return ctx.mesh is None or ctx.mesh.pp_rank == ctx.mesh.dims.pp - 1


def build_reference(
    job: JobConfig, loader: Any, ctx: ParallelContext, device: torch.device, amp_dtype
) -> Reference | None:
    """DPO's reference (None for other objectives). Precomputed: the values file named by
    posttrain.reference_values, else the one beside the data for this (tokenizer, checkpoint, data),
    computed now with one forward pass over the data when it does not exist yet."""
    p, t = job.posttrain, job.training
    if p.objective != "dpo":
        return None
    path = reference_checkpoint(job)
    if p.reference_mode == "co_resident":
        return CoResidentReference(load_frozen(job, path, device, ctx, amp_dtype), p.mask_format_tokens)
    if t.seq_len_stages:
        raise ConfigError(
            "precomputed DPO reference values are scored at training.seq_len: drop training.seq_len_stages "
            "or use posttrain.reference_mode=co_resident"
        )
    key = ReferenceKey(
        loader.datasets[0].tokenizer_sha256,
        checkpoint_sha256(path),
        data_sha256(loader.datasets, seq_len=t.seq_len, too_long=loader.too_long,
                    mask_format_tokens=p.mask_format_tokens),
    )  # fmt: skip
    if p.reference_values:
        return PrecomputedReference(p.reference_values, key)
    file = key.default_path(loader.datasets[0].path)
    if not file.is_file():
        if ctx.is_leader:
            print(f"computing the reference's log-probabilities of every pair into {file} (once)", flush=True)
        model = load_frozen(job, path, device, ctx, amp_dtype)
        batches = [b.to(device) for b in loader.epoch_batches(t.micro_batch_rows, t.seq_len)]
        values = compute_values(
            model, batches, p.mask_format_tokens, holds_head=holds_head(ctx), group=ctx.group
        )
        if ctx.is_leader:
            write_values(Path(file), key, values)
        ctx.broadcast(None)  # every rank reads the file once rank 0 wrote it
        del model
    return PrecomputedReference(file, key)
