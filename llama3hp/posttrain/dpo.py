"""Direct preference optimisation, the Llama 3 paper's variant, as a training objective.

Per preference pair (prompt, chosen c, rejected r), with log π the policy's summed log-probability
of a response's tokens and π_ref the frozen reference's:

    L = -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]) + α · NLL(c) / |c|

NLL(c) = -log π(c) over the same tokens, |c| their number. The paper's values: β = 0.1, α = 0.2
(learning rate 1e-5, set in the DPO configs). Formatting tokens (the header spans and <|eot_id|>
inside a response, `Batch.format_mask`) are left out of every sum by default: they contribute
exactly 0 to the loss and its gradient. `dpo_loss` below is the one place the formula is written.

Layout: `DPOLoss` is an `Objective` (`llama3hp.train.objectives`). The pairs of a batch are
`Batch.pairs` [n_pairs, 2], the (chosen, rejected) segments of `cu_seqlens` (with shared-prompt
packing the prompt is a third segment both responses attend to); per-segment sums come from
`HeadOutput.document_sums`, whole on every context-parallel rank, and each pair's loss is counted
on the rank owning its chosen segment (`HeadOutput.owned_documents`), so every layout sums each
pair once. The reference's numbers arrive in `Batch.ref_logps` (`llama3hp.posttrain.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama3hp.data.batch import IGNORE_INDEX, Batch
from llama3hp.model.head import HeadOutput
from llama3hp.train.objectives import ObjectiveOutput

PAPER_BETA = 0.1  # "The Llama 3 Herd of Models", section 4.1.4
PAPER_ALPHA = 0.2  # the NLL regulariser's coefficient
PAPER_LR = 1e-5


@dataclass
class DPOTerms:
    """Per-pair pieces of the loss, fp32 [n_pairs] each."""

    loss: torch.Tensor
    dpo: torch.Tensor  # -log σ(margin)
    nll: torch.Tensor  # NLL(c) / |c|
    chosen_reward: torch.Tensor  # β (log π(c) - log π_ref(c))
    rejected_reward: torch.Tensor  # β (log π(r) - log π_ref(r))

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    *,
    beta: float = PAPER_BETA,
    alpha: float = PAPER_ALPHA,
) -> DPOTerms:
    """The paper's DPO loss per pair (module docstring): summed log-probabilities [n_pairs] of the
    chosen and rejected responses under the policy and the reference, and |c| [n_pairs]."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    dpo = -F.logsigmoid(chosen_reward - rejected_reward)
    nll = -policy_chosen / n_chosen.clamp(min=1)
    return DPOTerms(dpo + alpha * nll, dpo, nll, chosen_reward, rejected_reward)


def response_targets(batch: Batch, mask_format_tokens: bool) -> torch.Tensor:
    """The targets DPO sums log-probabilities over: the responses' (`loss_mask`), without the
    formatting tokens when mask_format_tokens; IGNORE_INDEX elsewhere (never reaches a GEMM)."""
    if batch.loss_mask is None or batch.pairs is None:
        raise ValueError(
            "DPO needs preference batches (loss_mask and pairs): prepare data with --format preference"
        )
    keep = batch.loss_mask.bool()
    if mask_format_tokens and batch.format_mask is not None:
        keep = keep & ~batch.format_mask.bool()
    return batch.targets.masked_fill(~keep, IGNORE_INDEX)


def pair_logprobs(out: HeadOutput, batch: Batch, mask_format_tokens: bool) -> tuple[torch.Tensor, ...]:
    """(log π(c), log π(r), |c|, |r|) fp32 [n_pairs] each, whole on every CP rank; differentiable."""
    targets = response_targets(batch, mask_format_tokens)
    logp = out.token_logprobs(targets)
    counted = (targets != IGNORE_INDEX).reshape(-1).to(torch.float32)
    sums = out.document_sums(logp, batch)
    counts = out.document_sums(counted, batch).detach()
    assert batch.pairs is not None  # checked by response_targets
    c, r = batch.pairs[:, 0], batch.pairs[:, 1]
    return sums[c], sums[r], counts[c], counts[r]


@dataclass(frozen=True)
class DPOLoss:
    """The paper's DPO as an objective: the sum over the batch's pairs of `dpo_loss`, averaged over
    the step's pairs. Stats (per pair): dpo and nll parts, rewards of chosen and rejected, their
    margin, the accuracy (margin > 0), the policy's log-probabilities and its own per-token
    preference (`logps/accuracy`)."""

    beta: float = PAPER_BETA
    alpha: float = PAPER_ALPHA
    mask_format_tokens: bool = True

    def count(self, batch: Batch) -> torch.Tensor:
        if batch.pairs is None:
            raise ValueError("DPO needs preference batches: prepare data with --format preference")
        return torch.tensor(float(batch.pairs.shape[0]), device=batch.inputs.device)

    def __call__(self, out: HeadOutput, batch: Batch) -> ObjectiveOutput:
        if batch.ref_logps is None:
            raise ValueError(
                "DPO batches need the reference's log-probabilities (Batch.ref_logps): see posttrain.reference"
            )
        pc, pr, nc, nr = pair_logprobs(out, batch, self.mask_format_tokens)
        ref = batch.ref_logps.to(device=pc.device, dtype=torch.float32)
        t = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], nc, beta=self.beta, alpha=self.alpha)
        assert batch.pairs is not None  # checked by pair_logprobs
        owned = out.owned_documents(batch)[batch.pairs[:, 0]].to(torch.float32)
        stats = {
            "dpo": t.dpo, "nll": t.nll, "rewards/chosen": t.chosen_reward, "rewards/rejected": t.rejected_reward,
            "rewards/margin": t.margin, "rewards/accuracy": (t.margin > 0).to(torch.float32),
            "logps/chosen": pc, "logps/rejected": pr,
            # The model's own preference, per token so that length does not decide it.
            "logps/accuracy": (pc / nc.clamp(min=1) > pr / nr.clamp(min=1)).to(torch.float32),
        }  # fmt: skip
        return ObjectiveOutput(
            (t.loss * owned).sum(), owned.sum(), {k: (v.detach() * owned).sum() for k, v in stats.items()}
        )


@dataclass(frozen=True)
class PairLogprobs:
    """Not a loss: the (chosen, rejected) log-probabilities of every pair written into
    `Batch.ref_logps` (shared by a batch and its context-parallel shards). What the frozen reference
    runs, forward only (`StepModel.evaluate`), on the same layout as the policy."""

    mask_format_tokens: bool = True

    def count(self, batch: Batch) -> torch.Tensor:
        return DPOLoss().count(batch)

    def __call__(self, out: HeadOutput, batch: Batch) -> ObjectiveOutput:
        assert batch.ref_logps is not None, "allocate Batch.ref_logps before the reference pass"
        pc, pr, _, _ = pair_logprobs(out, batch, self.mask_format_tokens)
        batch.ref_logps.copy_(torch.stack([pc, pr], dim=1).detach())
        zero = pc.new_zeros(())
        return ObjectiveOutput(zero, zero)
