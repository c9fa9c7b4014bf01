"""The reward model's objective: the Bradley-Terry loss on the score of each response's last token.

A reward model is the Transformer with a scalar head (`ModelArgs.head = "reward"`,
`llama3hp.model.head.RewardHead`) initialised from a pre-trained checkpoint. Its score of a response
r(x, y) is the head's value at the last token of [prompt | response] (the response's <|eot_id|>, or
its last kept token when truncated). Per ordered pair (better b, worse w) of one prompt's responses,
the paper's loss, without a margin term:

    L = -log σ(r(b) - r(w))

A ranking edited > chosen > rejected is read as its three ordered pairs (`llama3hp.data.examples`,
`ranked`), the responses of a prompt packed in one row after the prompt they share (the attention's
shared prefix). `bradley_terry_loss` below is the one place the formula is written.

Layout: `response_scores` reads every segment's last-token score through `HeadOutput.document_sums`
(the per-token scores masked to the segments' last tokens): whole on every context-parallel rank,
wherever the last token lives; each pair's loss is counted on the rank owning its better segment
(`HeadOutput.owned_documents`), so every layout sums each pair once. Under TP the head's [1, D] row is
replicated (`llama3hp.parallel.vocab_parallel.ParallelRewardHead`); on a pipeline the last stage
runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama3hp.data.batch import Batch
from llama3hp.model.head import HeadOutput
from llama3hp.train.objectives import ObjectiveOutput

# The reward head's parameters, which a language model's checkpoint lacks (initialised afresh).
REWARD_HEAD = ("output.score",)


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """-log σ(r(better) - r(worse)) per pair: scores fp32 [n_pairs] each -> [n_pairs]."""
    return -F.logsigmoid(better - worse)


def last_token_mask(batch: Batch, n_local: int, device: torch.device) -> torch.Tensor:
    """bool [N]: which of this batch's (local) tokens end a segment of `batch.cu_seqlens`."""
    if batch.cu_seqlens is None:
        raise ValueError("reward scores need the segments of the rows (Batch.cu_seqlens)")
    ends = batch.cu_seqlens[1:].to(device=device, dtype=torch.int64) - 1
    index = (
        batch.token_index.reshape(-1).to(device)
        if batch.token_index is not None
        else torch.arange(n_local, device=device)
    )
    return torch.isin(index, ends)


def response_scores(out: HeadOutput, batch: Batch) -> torch.Tensor:
    """fp32 [n_segments]: the score of each segment's last token, whole on every CP rank; differentiable."""
    s = out.scores()
    keep = last_token_mask(batch, s.numel(), s.device)
    return out.document_sums(torch.where(keep, s, torch.zeros_like(s)), batch)


@dataclass(frozen=True)
class RewardLoss:
    """The Bradley-Terry loss as an objective: the sum over the batch's ordered pairs of
    `bradley_terry_loss`, averaged over the step's pairs. Stats (per pair): accuracy (better scored
    above worse), the mean scores of the better ("chosen") and worse ("rejected") responses, and
    their margin."""

    def count(self, batch: Batch) -> torch.Tensor:
        if batch.pairs is None:
            raise ValueError("a reward model needs preference batches: prepare data with --format preference")
        return torch.tensor(float(batch.pairs.shape[0]), device=batch.inputs.device)

    def __call__(self, out: HeadOutput, batch: Batch) -> ObjectiveOutput:
        self.count(batch)
        assert batch.pairs is not None
        scores = response_scores(out, batch)
        b, w = batch.pairs[:, 0], batch.pairs[:, 1]
        better, worse = scores[b], scores[w]
        loss = bradley_terry_loss(better, worse)
        owned = out.owned_documents(batch)[b].to(torch.float32)
        stats = {
            "accuracy": (better > worse).to(torch.float32), "rewards/chosen": better, "rewards/rejected": worse,
            "rewards/margin": better - worse,
        }  # fmt: skip
        return ObjectiveOutput(
            (loss * owned).sum(), owned.sum(), {k: (v.detach() * owned).sum() for k, v in stats.items()}
        )
