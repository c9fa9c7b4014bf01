"""`Batch`: the one batch type, from the loader to the objective, on one process and on any mesh.

The loader yields full rows; a context-parallel rank's view of the same rows is a `Batch` too
(`llama3hp.parallel.context.shard_batch`), with `positions` and `token_index` filled in so the model
and the objective never need to know which tokens the rank holds.

Shape legend: B rows, T tokens per row (T/cp on a context-parallel rank).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the data package is importable without torch (`prepare`, `curate`)
    import torch

IGNORE_INDEX = -100  # a target that is not trained on (padding, a masked prompt token)


@dataclass
class Batch:
    """Packed rows of documents.

    `cu_seqlens` are GLOBAL offsets into the flattened B*T tokens of the full rows: every row start
    and every document (or non-contiguous piece) start inside a row begins a segment; None means
    one document per row.
    """

    inputs: torch.Tensor  # int64 [B, T] token ids
    targets: torch.Tensor  # int64 [B, T] next tokens; IGNORE_INDEX is not trained on
    cu_seqlens: torch.Tensor | None = None  # int32 [n_segments + 1]
    max_seqlen: int | None = None  # the longest segment (sizes the attention grid without a sync)
    loss_mask: torch.Tensor | None = None  # bool [B, T]: True where a masked objective trains (SFT)
    positions: torch.Tensor | None = None  # int64 [B, T] RoPE positions (None: restart per segment)
    # int64 [B, T]: each token's index in the flattened full rows (None: the rows are whole, the
    # index is the token's own flat position). Set on a context-parallel rank's shard.
    token_index: torch.Tensor | None = None
    # Post-training (`llama3hp.data.examples`). int32 [n_segments]: each segment's shared prefix, an
    # earlier segment of its row that it also attends to entirely (-1: none): DPO's shared-prompt
    # packing [prompt | chosen | rejected] gives both responses the prompt (kernels/attention).
    doc_prefix: torch.Tensor | None = None
    # bool [B, T]: targets that are formatting tokens (headers, <|eot_id|>) inside a response; DPO
    # leaves them out of its log-probability sums by default.
    format_mask: torch.Tensor | None = None
    # int64 [n_pairs, 2]: the (chosen, rejected) segments of each preference pair in these rows.
    pairs: torch.Tensor | None = None
    # int64 [n_pairs]: each pair's sample id (its line in the prepared data), the key of reference values.
    pair_ids: torch.Tensor | None = None
    # fp32 [n_pairs, 2]: the frozen reference model's log-probabilities of (chosen, rejected), filled
    # by `llama3hp.posttrain.reference` before the step.
    ref_logps: torch.Tensor | None = None

    PER_TOKEN: ClassVar[tuple[str, ...]] = (
        "inputs",
        "targets",
        "loss_mask",
        "format_mask",
    )  # the [B, T] fields a CP shard cuts

    @property
    def n_tokens(self) -> int:
        """B*T, the tokens (and targets) of these rows."""
        return self.inputs.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: t.to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if hasattr(t := getattr(self, f.name), "to")
        }
        return dataclasses.replace(self, **moved)
