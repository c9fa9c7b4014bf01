"""Tensor-parallel communication: Megatron's conjugate operators and the plan a module calls.

Column-parallel linears split output features over the TP ranks, row-parallel linears split input
features. With sequence parallelism the residual stream and the norms live on sequence shards
[B, T/tp, D]: an all-gather before the column linears (`GatherFromSP`), a reduce-scatter after the
row linears (`ReduceScatterToSP`). Without it they are replicated and the f/g operators are used
(`CopyToTP`: identity forward, all-reduce backward; `ReduceFromTP`: the reverse). `TPComm` is what
the parallel modules call: `column`, `row`, `gather` and `reduce_partial` pick the operator (or the
overlapped GEMMs of `tp_overlap.py`) for the layout.

Shape legend: B rows, T tokens per row (after CP), S = T/tp tokens of a sequence shard, D model dim,
O output features of a local shard, F_l local input features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama3hp.kernels.dispatch import matmul_dtype
from llama3hp.model.grouped import CatCast, groupable, grouped_linear
from llama3hp.parallel.comm import (
    all_gather_dim,
    all_reduced,
    group_rank,
    group_size,
    reduce_scatter_dim,
)
from llama3hp.parallel.tp_overlap import AllGatherMatmul, Linear, MatmulReduceScatter, PlainGemms, gemms_for


class CopyToTP(torch.autograd.Function):
    """f: forward identity, backward all-reduce over TP (input of column linears without SP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduced(g, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce over TP, backward identity (output of row linears without SP)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduced(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class GatherFromSP(torch.autograd.Function):
    """Forward all-gather the sequence shards (dim 1), backward reduce-scatter the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim(g, 1, ctx.group), None


class ReduceScatterToSP(torch.autograd.Function):
    """Forward reduce-scatter partial sums to sequence shards (dim 1), backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim(g, 1, ctx.group), None


def _weight(linear: Linear) -> torch.Tensor:
    if isinstance(linear, torch.Tensor):
        return linear
    if linear.bias is not None:
        raise ValueError(
            "the overlapped TP paths take bias-free linears (Llama has none): set tp_overlap=false"
        )
    return linear.weight


def _call(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear) if isinstance(linear, torch.Tensor) else linear(x)


@dataclass
class TPComm:
    """The TP group and how its linears communicate (None group: no tensor parallelism)."""

    group: dist.ProcessGroup | None = None
    sequence_parallel: bool = True
    overlap: bool = False
    chunks: int = 2
    chunked_loss: bool = True  # VocabParallelLinearCrossEntropy instead of materialised shard logits

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def column(self, x: torch.Tensor, linears: list[Linear], grouped: bool = False) -> list[torch.Tensor]:
        """x: [B, S, D] (SP shard) or [B, T, D] (replicated); linears with weights [O_k, D] -> [B, T, O_k] each.

        grouped: run the linears as one GEMM (`column_grouped`) where they are `groupable`, as the
        one-process model does for q/k/v, so every layout computes what one process does, FP8 scales
        included."""
        if grouped and groupable(linears):
            y = self.column_grouped(x, cast(list[nn.Linear], linears))
            return list(y.split([_weight(lin).shape[0] for lin in linears], dim=-1))
        if self.size == 1:
            return [_call(lin, x) for lin in linears]
        if not self.sequence_parallel:
            x = CopyToTP.apply(x, self.group)
            return [_call(lin, x) for lin in linears]
        if self.overlap:
            dt = matmul_dtype(x)
            gemms = tuple(gemms_for(lin) for lin in linears)
            weights = [_weight(lin) for lin in linears]
            return list(AllGatherMatmul.apply(x.to(dt), self.group, self.chunks, gemms, dt, *weights))
        x = GatherFromSP.apply(x, self.group)
        return [_call(lin, x) for lin in linears]

    def column_grouped(self, x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
        """`llama3hp.model.grouped.grouped_linear` over the local shards of `groupable` column linears:
        x [B, S, D] (SP shard) or [B, T, D] -> [B, T, sum of O_k], each linear's local outputs in order."""
        if self.size == 1:
            return grouped_linear(x, linears)
        if not self.sequence_parallel:
            return grouped_linear(CopyToTP.apply(x, self.group), linears)
        if self.overlap:
            dt, gemms = matmul_dtype(x), gemms_for(linears[0])
            weights = [_weight(lin) for lin in linears]  # grads flow back to each weight
            # Plain GEMMs take the weights cast and concatenated in one pass; FP8 quantizes the masters.
            w = CatCast.apply(dt, *weights) if gemms is PlainGemms else torch.cat(weights)
            (y,) = AllGatherMatmul.apply(x.to(dt), self.group, self.chunks, (gemms,), dt, w)
            return y
        return grouped_linear(GatherFromSP.apply(x, self.group), linears)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D] (SP shard) or [B, T, D] -> [B, T, D] on every TP rank; backward sums the
        partial input gradients over TP (reduce-scatter under SP, all-reduce without)."""
        if self.size == 1:
            return x
        if self.sequence_parallel:
            return GatherFromSP.apply(x, self.group)
        return CopyToTP.apply(x, self.group)

    def row(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """x: [B, T, F_l]; a linear with weight [D, F_l] -> [B, S, D] (SP) or [B, T, D] summed over TP."""
        if self.size == 1:
            return _call(linear, x)
        if self.sequence_parallel and self.overlap:
            w = _weight(linear)
            dt = matmul_dtype(x)
            return MatmulReduceScatter.apply(x.to(dt), self.group, self.chunks, gemms_for(linear), dt, w)
        return self.reduce_partial(_call(linear, x))

    def reduce_partial(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums [B, T, D] -> summed, sequence-sharded under SP."""
        if self.size == 1:
            return y
        if self.sequence_parallel:
            return ReduceScatterToSP.apply(y, self.group)
        return ReduceFromTP.apply(y, self.group)
