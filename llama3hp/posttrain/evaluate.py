"""Held-out metrics of a checkpoint: `llama3hp evaluate --config ... [--checkpoint C]`.

Every example of posttrain.eval_datasets once, forward only, on the job's layout:
- SFT (and pre-training): the mean cross-entropy of the response tokens (`response_loss`);
- DPO: the DPO loss and its parts against the reference (posttrain.reference, else
  training.init_from), the reward accuracy and margin, and `logps/accuracy`, how often the model
  itself gives the chosen response a higher per-token log-probability than the rejected one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from llama3hp.data.examples import ExampleLoader
from llama3hp.errors import ConfigError
from llama3hp.parallel.distributed import ParallelContext
from llama3hp.posttrain.build import build_objective, load_frozen, reference_checkpoint
from llama3hp.posttrain.reference import CoResidentReference

if TYPE_CHECKING:
    from llama3hp.config import JobConfig


def evaluate_checkpoint(job: JobConfig, checkpoint: str | None, ctx: ParallelContext) -> dict[str, Any]:
    """{metric: value} of `checkpoint` (default: training.init_from) on posttrain.eval_datasets."""
    from llama3hp.data import build_loader
    from llama3hp.train import build

    p, t = job.posttrain, job.training
    if not p.eval_datasets:
        raise ConfigError(
            "posttrain.eval_datasets is empty: list the held-out prepared datasets to evaluate on"
        )
    checkpoint = checkpoint or t.init_from
    if not checkpoint:
        raise ConfigError("evaluate needs a checkpoint: pass --checkpoint or set training.init_from")
    device = build.select_device(t.device, ctx)
    amp = build.autocast_dtype(t.dtype, device)
    data = dataclasses.replace(job.data, datasets=list(p.eval_datasets))
    loader = build_loader(data, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    if not isinstance(loader, ExampleLoader):
        raise ConfigError(
            "posttrain.eval_datasets must be post-training data (prepared with --format sft|preference)"
        )
    objective = build_objective(job, loader)
    batches = [b.to(device) for b in loader.epoch_batches(t.micro_batch_rows, t.seq_len)]
    if p.objective == "dpo":
        reference = load_frozen(job, reference_checkpoint(job), device, ctx, amp)
        CoResidentReference(reference, p.mask_format_tokens).annotate(batches)
        del reference
    model = load_frozen(job, checkpoint, device, ctx, amp)
    stats = model.evaluate(batches, objective)
    name = "response_loss" if p.objective == "sft" else "loss"
    out = {"checkpoint": str(checkpoint), "examples": loader.n_examples, "count": stats.count.item(),
           name: stats.loss.item(), **{k: v.item() for k, v in stats.stats.items()}}  # fmt: skip
    return out
