"""`Batch`: the one batch type, from the loader to the objective, on one process and on any mesh.

The loader yields full rows; a context-parallel rank's view of the same rows is a `Batch` too
(`llama3hp.parallel.context.shard_batch`), with `positions` and `token_index` filled in so the model
and the objective never need to know which tokens the rank holds.

Shape legend: B rows, T tokens per row (T/cp on a context-parallel rank).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
