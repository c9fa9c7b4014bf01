"""Several linears that read the same input, run as ONE GEMM over their concatenated weights.

Attention's q, k and v projections read the same x, and so do the FFN's w1 and w3: one GEMM with
N = (H + 2 Hk) Dh (the k/v projections alone are narrow: N = 512 on the 1B) instead of three, and in
backward one input-gradient GEMM over the summed K instead of three plus their sum. The parameters
are untouched (each linear keeps its own weight and name); the tensor-parallel paths group the
same projections over their local shards (`llama3hp.parallel.tp_comm.TPComm.column_grouped`), so
every layout computes what one process does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from llama3hp.kernels.dispatch import matmul_dtype


def groupable(linears: Sequence[nn.Module | torch.Tensor]) -> bool:
    """Whether `grouped_linear` can run these as one GEMM: two or more bias-free linears, all plain
    nn.Linear or all Fp8Linear with one FP8 config (not TE modules, not a mix)."""
    kind = type(linears[0])
    lins = [lin for lin in linears if isinstance(lin, nn.Linear) and type(lin) is kind and lin.bias is None]
    if len(linears) < 2 or len(lins) != len(linears):
        return False
    if kind is nn.Linear:
        return True
    from llama3hp.fp8.linear import Fp8Linear

    first = cast(Fp8Linear, lins[0])
    return kind is Fp8Linear and all(cast(Fp8Linear, lin).fp8_config == first.fp8_config for lin in lins)


class CatCast(torch.autograd.Function):
    """torch.cat([w.to(dtype) for w in weights]) in one pass: each weight is cast straight into its rows
    of the output, one read of the (fp32 master) weights and one write of the result instead of a cast
    and then a copy. Backward hands each weight its rows of the gradient, cast to its dtype."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        rows = [w.shape[0] for w in weights]
        out = torch.empty((sum(rows), *weights[0].shape[1:]), dtype=dtype, device=weights[0].device)
        for piece, w in zip(out.split(rows), weights):
            piece.copy_(w)
        ctx.rows, ctx.dtypes = rows, [w.dtype for w in weights]
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, *(g.to(dt) for g, dt in zip(grad.split(ctx.rows), ctx.dtypes))


def grouped_linear(x: torch.Tensor, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """The linears of x as ONE GEMM over their concatenated weights: [..., sum of their outputs], each
    linear's outputs in order (under TP: the local shards'). The linears must be `groupable`.

    Attention's q, k and v projections read the same x: one GEMM with N = (H + 2 Hk) Dh instead of
    three (the k/v ones are narrow: N = 512 on the 1B), and the backward's three input-gradient GEMMs
    and their sum become one GEMM; likewise the FFN's w1 and w3, whose output `swiglu_packed` takes
    whole. Plain linears get their weights cast to the matmul dtype and concatenated in one pass
    (`CatCast`); FP8 linears quantize x once instead of once per linear (the weights' per-output-channel
    scales are the same as separately; the input gradient's per-token scales span all the outputs).
    Parameters are untouched.
    """
    if type(linears[0]) is nn.Linear:
        dt = matmul_dtype(x)
        return F.linear(x.to(dt), CatCast.apply(dt, *(lin.weight for lin in linears)))
    from llama3hp.fp8.linear import Fp8Linear, fp8_linear

    first = linears[0]
    assert isinstance(first, Fp8Linear)
    return fp8_linear(x, torch.cat([lin.weight for lin in linears]), None, first.fp8_config)


def grouped_linears(x: torch.Tensor, linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """[lin(x) for lin in linears], as one `grouped_linear` GEMM split by output where they are
    `groupable`, else one linear at a time."""
    if not groupable(linears):
        return [lin(x) for lin in linears]
    y = grouped_linear(x, linears)
    return list(y.split([lin.weight.shape[0] for lin in linears], dim=-1))
