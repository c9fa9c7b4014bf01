"""Training objectives: what a step minimises, handed to `forward_backward` as an object.

An objective reads the model's `HeadOutput` (the final hidden states bound to the output head,
`llama3hp.model.head`) and the batch, and returns the SUM of its loss over what the batch holds,
with the count it should be averaged over and named statistics. It never sees the layout: under
tensor parallelism the head is vocab-parallel, under context parallelism the batch is the rank's
tokens (`Batch.token_index` says which) and `HeadOutput.document_sums` reduces over the ranks, on
a pipeline the last stage calls it; the step model (`llama3hp.parallel.step_model`) sums the
results over micro-batches and ranks.

Two kinds of loss fit this: sums over tokens (cross-entropy: each rank sums the tokens it holds),
and functions of whole documents (DPO, a reward model: per-document log-probabilities from
`HeadOutput.document_logprobs`, the same on every rank holding a document's tokens, summed over
`HeadOutput.owned_documents` so each document counts once).

The step divides every micro-batch's loss sum by the step's total `count` (over all micro-batches
and data-parallel ranks, known before the first forward), so the accumulated gradient is exactly
the gradient of the mean over the whole batch, however it is split.

Shipped: `NextTokenLoss` (pre-training) and `MaskedNextTokenLoss` (only tokens whose
`Batch.loss_mask` is set: SFT's assistant tokens) here, the paper's DPO in
`llama3hp.posttrain.dpo`; `[posttrain] objective` picks one (`llama3hp.posttrain.build`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from llama3hp.data.batch import IGNORE_INDEX, Batch
from llama3hp.model.head import HeadOutput


@dataclass
class ObjectiveOutput:
    """One micro-batch's share of the loss."""

    loss_sum: torch.Tensor  # fp32 scalar with a gradient: the loss summed over what the batch holds
    count: torch.Tensor  # fp32 scalar: how many things it summed over (target tokens, pairs, ...)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # named fp32 sums, detached


class Objective(Protocol):
    """What `forward_backward` minimises (see the module docstring)."""

    def count(self, batch: Batch) -> torch.Tensor:
        """The count (fp32 scalar) this batch's loss sum is averaged over: known before the forward,
        from the FULL rows (before any context-parallel split)."""
        ...

    def __call__(self, out: HeadOutput, batch: Batch) -> ObjectiveOutput: ...


@dataclass(frozen=True)
class NextTokenLoss:
    """Cross-entropy of every target token (IGNORE_INDEX targets skipped), plus PaLM's z-loss
    z_loss_scale * logsumexp(logits)^2 per token when z_loss_scale > 0."""

    z_loss_scale: float = 0.0

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch.targets

    def count(self, batch: Batch) -> torch.Tensor:
        return (self.targets(batch) != IGNORE_INDEX).sum().to(torch.float32)

    def __call__(self, out: HeadOutput, batch: Batch) -> ObjectiveOutput:
        targets = self.targets(batch)
        loss = out.loss(targets, reduction="sum", z_loss_scale=self.z_loss_scale)
        return ObjectiveOutput(loss, (targets != IGNORE_INDEX).sum().to(torch.float32))


@dataclass(frozen=True)
class MaskedNextTokenLoss(NextTokenLoss):
    """Next-token cross-entropy over the tokens whose `Batch.loss_mask` is True only (SFT: the
    assistant's tokens, not the prompt's nor the chat format's)."""

    def targets(self, batch: Batch) -> torch.Tensor:
        if batch.loss_mask is None:
            raise ValueError(
                "MaskedNextTokenLoss needs batches with a loss_mask: train on data prepared with one "
                "or use NextTokenLoss"
            )
        return batch.targets.masked_fill(~batch.loss_mask.bool(), IGNORE_INDEX)


OBJECTIVES = {"next_token": NextTokenLoss, "masked_next_token": MaskedNextTokenLoss}
