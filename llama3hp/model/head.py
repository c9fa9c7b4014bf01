"""The output head: the projection to the vocabulary and everything read from it.

`OutputHead(h)` returns a `HeadOutput`: the final (normed) hidden states bound to the head. Losses,
per-token log-probabilities and logits are computed from it on demand, so a loss over a 128K
vocabulary never materialises the [N, V] logits (the fused linear cross-entropy kernel), and an
objective (`llama3hp.train.objectives`) asks only for what it needs.

Tensor and context parallelism swap the head for `llama3hp.parallel.vocab_parallel.ParallelHead`,
which keeps the parameter name (`output.weight`, a vocabulary shard under TP) and overrides the
four methods a `HeadOutput` calls: `cross_entropy`, `token_logprobs` (the fused chunked log-prob
kernel, `kernels/logprobs.py`, vocab-parallel under TP), `logits` and `reduce_documents`. So the model's
forward, and every objective, is the same on one process and on any layout.

Shape legend: B rows, T tokens per row (a rank's local tokens under CP), D model dim, V vocabulary
(the local shard under TP), N = B*T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import llama3hp.kernels as K
from llama3hp.data.batch import IGNORE_INDEX, Batch


class OutputHead(nn.Module):
    """The [V, D] projection to logits: `weight` (a Parameter named output.weight), or with
    `tied_to` the embedding's matrix itself (Llama 3.2's tied presets)."""

    def __init__(
        self, weight: torch.Tensor | None, backend: str = "auto", tied_to: nn.Embedding | None = None
    ):
        super().__init__()
        if (weight is None) == (tied_to is None):
            raise ValueError("an output head takes its own weight or an embedding to tie to, not both")
        self.backend = backend
        self._tied: tuple[nn.Embedding, ...] = ()
        if tied_to is None:
            assert weight is not None
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        else:
            # Read at call time, so it survives to_empty and load_state_dict; held in a tuple so that
            # nn.Module does not register the embedding a second time (its name stays
            # tok_embeddings.weight, and the state dict has no output.weight, as in Hugging Face's layout).
            self._tied = (tied_to,)

    @property
    def tied_embedding(self) -> nn.Embedding | None:
        return self._tied[0] if self._tied else None

    def projection(self) -> torch.Tensor:
        """The [V, D] matrix the head multiplies by."""
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, h: torch.Tensor) -> HeadOutput:
        """h: [B, T, D] final normed hidden states."""
        return HeadOutput(self, h)

    # What a HeadOutput computes with; ParallelHead overrides these four.
    def cross_entropy(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        *,
        ignore_index: int,
        reduction: str,
        z_loss_scale: float,
    ) -> torch.Tensor:
        """Loss of h [B, T, D] against targets [B, T]: fp32 scalar ("sum", "mean") or [N] ("none")."""
        return K.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.projection(), targets.reshape(-1), ignore_index=ignore_index,
            reduction=reduction, z_loss_scale=z_loss_scale, backend=self.backend,
        )  # fmt: skip

    def token_logprobs(self, h: torch.Tensor, targets: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
        """log p(target) fp32 [N] of h [B, T, D] against targets [B, T] (0 where ignored): the
        ignored rows never reach a GEMM, the logits are chunked (`kernels/logprobs.py`)."""
        return K.linear_logprobs(
            h.reshape(-1, h.shape[-1]), self.projection(), targets.reshape(-1), ignore_index=ignore_index,
            backend=self.backend,
        )  # fmt: skip

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.projection())

    def reduce_documents(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-document sums [n_docs] of this rank's tokens -> over every token (one process: all)."""
        return sums


class HeadOutput:
    """The final hidden states h [B, T, D] bound to the head that reads them."""

    def __init__(self, head: OutputHead, h: torch.Tensor):
        self.head, self.h = head, h

    def loss(
        self,
        targets: torch.Tensor,
        *,
        reduction: str = "sum",
        ignore_index: int = IGNORE_INDEX,
        z_loss_scale: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy against targets [B, T] (plus PaLM's z-loss): "sum" or "mean" over the
        non-ignored targets (fp32 scalar), or "none" (fp32 [N], 0 on ignored targets)."""
        return self.head.cross_entropy(
            self.h, targets, ignore_index=ignore_index, reduction=reduction, z_loss_scale=z_loss_scale
        )

    def token_logprobs(self, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """log p(target) of each token, fp32 [N] (0 where the target is ignored); differentiable."""
        return self.head.token_logprobs(self.h, targets, ignore_index=ignore_index)

    def document_sums(self, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-document sums [n_docs] of per-token values [B, T] or [N] of this batch, over the
        documents of `batch.cu_seqlens` (one per row when None) and over every rank holding tokens
        of them (context parallelism); differentiable. The documents are the segments of the
        GLOBAL rows, so every layout gives the same sums."""
        values = values.reshape(-1)
        if batch.cu_seqlens is None:  # one document per (whole) row
            if batch.token_index is not None:
                raise ValueError("a sharded batch carries its rows' cu_seqlens: build it with shard_batch")
            doc = torch.arange(values.numel(), device=values.device) // batch.inputs.shape[1]
            n_docs = batch.inputs.shape[0]
        else:
            cu = batch.cu_seqlens.to(device=values.device, dtype=torch.int64)
            index = (
                batch.token_index.reshape(-1).to(values.device)
                if batch.token_index is not None
                else torch.arange(values.numel(), device=values.device)
            )
            doc = torch.searchsorted(cu[1:], index, right=True)
            n_docs = cu.numel() - 1
        sums = values.new_zeros(n_docs).index_add(0, doc, values)
        return self.head.reduce_documents(sums)

    def owned_documents(self, batch: Batch) -> torch.Tensor:
        """bool [n_docs]: the documents whose loss this rank counts. `document_sums` gives every
        context-parallel rank the same whole-document sums, so an objective built on them (DPO's
        pair losses, a reward model's) sums its per-document losses over these only: each document
        is counted once, on the rank holding its first token, and the gradient still reaches every
        rank's tokens (the sums' backward adds the ranks' gradients). On one process: all of them."""
        if batch.cu_seqlens is None or batch.token_index is None:
            n_docs = batch.inputs.shape[0] if batch.cu_seqlens is None else batch.cu_seqlens.numel() - 1
            return torch.ones(n_docs, dtype=torch.bool, device=batch.inputs.device)
        starts = batch.cu_seqlens[:-1].to(device=batch.token_index.device, dtype=torch.int64)
        return torch.isin(starts, batch.token_index.reshape(-1))

    def document_logprobs(self, batch: Batch, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Sum of log p(target) over each document of the batch, fp32 [n_docs]: what DPO and a reward
        model read (a sequence's log-likelihood)."""
        return self.document_sums(self.token_logprobs(batch.targets, ignore_index=ignore_index), batch)

    def logits(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, V] logits (materialised: for inference and tests, not for a loss); with `rows`
        (int [R], indices into the flattened B*T tokens) only those rows' logits, [R, V]: a serving
        step projects just the tokens it samples from (the last of each prompt), not every one."""
        if rows is None:
            return self.head.logits(self.h)
        return self.head.logits(self.h.reshape(-1, self.h.shape[-1]).index_select(0, rows))
