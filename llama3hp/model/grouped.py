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
    nn.Linear, all Fp8Linear or all Fp8InferenceLinear with one FP8 config (not TE modules, not a mix)."""
    kind = type(linears[0])
    from llama3hp.fp8.inference import Fp8InferenceLinear

    if kind is Fp8InferenceLinear:  # FP8 serving: one quantization of x, one GEMM over packed rows
        return len(linears) > 1 and all(
            type(lin) is kind
            and cast(Fp8InferenceLinear, lin).fp8_config == cast(Fp8InferenceLinear, linears[0]).fp8_config
            for lin in linears
        )
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


def packed_rows(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The weights [O_k, K] as ONE [sum of O_k, K] view when they already are consecutive row blocks
    of one buffer (`pack_rows_` made them so) and no gradient is wanted, else None.

    A decode step is bound by reading the weights: concatenating q/k/v (or w1/w3) on every call, as
    `CatCast` does for training's fp32 masters, would read and write them once more per token."""
    first = weights[0]
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return None
    ptr = first.data_ptr()
    for w in weights:
        if (
            not w.is_contiguous()
            or w.dtype != first.dtype
            or w.shape[1:] != first.shape[1:]
            or w.data_ptr() != ptr
            or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        ):
            return None
        ptr += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def pack_rows_(linears: Sequence[nn.Module], attr: str = "weight") -> None:
    """Re-home the `attr` tensors [O_k, ...] of `linears` into consecutive rows of one new buffer, in
    order (values, names and dtypes unchanged), so `packed_rows` reads them as one matrix for free.
    For inference (the tensors lose their gradient): the serving engine packs q/k/v and w1/w3."""
    tensors = [getattr(lin, attr) for lin in linears]
    buf = torch.cat([t.detach() for t in tensors])
    start = 0
    for lin, t in zip(linears, tensors):
        view = buf[start : start + t.shape[0]]
        start += t.shape[0]
        if isinstance(t, nn.Parameter):
            setattr(lin, attr, nn.Parameter(view, requires_grad=False))
        else:
            setattr(lin, attr, view)


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
        weights = [lin.weight for lin in linears]
        packed = packed_rows(weights)
        if packed is not None and packed.dtype == dt:  # inference: no copy at all
            return F.linear(x.to(dt), packed)
        return F.linear(x.to(dt), CatCast.apply(dt, *weights))
    from llama3hp.fp8.inference import Fp8InferenceLinear, fp8_inference_gemm
    from llama3hp.fp8.linear import Fp8Linear, fp8_linear

    first = linears[0]
    if isinstance(first, Fp8InferenceLinear):
        mods = cast(Sequence[Fp8InferenceLinear], linears)
        wq = packed_rows([m.weight for m in mods])
        scales = packed_rows([m.weight_scale_inv for m in mods])
        if wq is None or scales is None:
            wq, scales = torch.cat([m.weight for m in mods]), torch.cat([m.weight_scale_inv for m in mods])
        return fp8_inference_gemm(x, wq, scales, first.fp8_config)
    assert isinstance(first, Fp8Linear)
    return fp8_linear(x, torch.cat([lin.weight for lin in linears]), None, first.fp8_config)


def grouped_linears(x: torch.Tensor, linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """[lin(x) for lin in linears], as one `grouped_linear` GEMM split by output where they are
    `groupable`, else one linear at a time."""
    if not groupable(linears):
        return [lin(x) for lin in linears]
    y = grouped_linear(x, linears)
    return list(y.split([lin.weight.shape[0] for lin in linears], dim=-1))
