"""Tensor-parallel GEMMs whose collectives overlap compute (the async-TP / userbuffers idea).

`AllGatherMatmul` replaces "all-gather the sequence shards, then GEMM" and `MatmulReduceScatter`
replaces "GEMM, then reduce-scatter": the sequence shard is cut into `tp_overlap_chunks` chunks
whose collectives are launched asynchronously and pipelined with the GEMMs of the previous chunk.
Both compute the same rows with the same GEMMs as the plain path (`TPComm` with overlap off), so
results agree to float32 rounding.

FP8: `gemms_for` gives an `llama3hp.fp8.Fp8Linear` its `Fp8Gemms`, run chunk by chunk (they give the
same rows as the whole GEMM). Scales follow each GEMM's reduction dim, so where that dim is split
over TP (a row-parallel forward, a column-parallel input gradient) they are per shard: finer than
one process's, equal to FP8 tolerance.

Shape legend: B rows, T tokens per row (after CP), S = T/tp tokens of a sequence shard, D model dim,
O output features of a local shard, F_l local input features.
"""

from __future__ import annotations

import torch
from torch import nn

from llama3hp.kernels.dispatch import autocast_off
from llama3hp.parallel.comm import all_gather_single, group_size, reduce_scatter_single

# What the TP paths multiply by: a linear module (nn.Linear, or its FP8 subclass, whose own forward
# then runs) or a bare weight [O, D].
Linear = nn.Module | torch.Tensor


class PlainGemms:
    """The three GEMMs of y = x W^T in the GEMM dtype: the callers cast the activations at entry and
    the weight once per pass through `weight_operand`, so every operand already has it."""

    @staticmethod
    def weight_operand(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w.to(dtype)

    @staticmethod
    def fprop(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return (x @ w.T).to(out_dtype)

    @staticmethod
    def dgrad(dy: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return (dy @ w).to(out_dtype)

    @staticmethod
    def wgrad(dy: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return (dy.T @ x).to(out_dtype)


def gemms_for(linear: Linear):
    """The GEMMs the overlapped TP paths run for `linear`: FP8 for an Fp8Linear, plain otherwise."""
    cfg = getattr(linear, "fp8_config", None)
    if cfg is None:
        return PlainGemms
    from llama3hp.fp8.linear import Fp8Gemms

    return Fp8Gemms(cfg)


class AllGatherMatmul(torch.autograd.Function):
    """Forward: y_k = all_gather(x) @ W_k.T with the gather of chunk c+1 in flight during the GEMMs of
    chunk c. Backward: dx = reduce_scatter(sum_k dy_k @ W_k), each chunk's reduce-scatter in flight
    during the next chunk's GEMMs; dW_k = dy_k.T @ all_gather(x) (the gathered x is kept).
    `gemms[k]` runs W_k's three GEMMs (`PlainGemms`, or `llama3hp.fp8.Fp8Gemms` for an FP8 linear).

    x: [B, S, D] sequence shard, already in the GEMM dtype (`TPComm.column` casts it, so the gather
    moves bf16 under autocast); weights W_k: [O_k, D] (master weights). Returns y_k: [B, tp*S, O_k]
    in out_dtype. Forward and backward run with autocast off: every dtype is explicit.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, group, n_chunks, gemms, out_dtype, *weights):
        tp = group_size(group)
        B, S, D = x.shape
        s = S // n_chunks
        pieces = [x[:, c * s : (c + 1) * s].contiguous() for c in range(n_chunks)]
        # Single-tensor collectives take [tp * B, ...] buffers; viewed as [tp, B, s, D] after.
        bufs = [x.new_empty(tp * B, s, D) for _ in range(n_chunks)]
        start = lambda c: all_gather_single(bufs[c], pieces[c], group=group, async_op=True)
        x_full = x.new_empty(B, tp, n_chunks, s, D)
        outs = [x.new_empty(B, tp, n_chunks, s, w.shape[0], dtype=out_dtype) for w in weights]
        operands = [mm.weight_operand(w, out_dtype) for w, mm in zip(weights, gemms)]
        work = start(0)
        for c in range(n_chunks):
            nxt = start(c + 1) if c + 1 < n_chunks else None
            work.wait()
            g = bufs[c].view(tp, B, s, D)
            x_full[:, :, c] = g.permute(1, 0, 2, 3)  # [B, tp, s, D]
            # The GEMMs take the gathered rows in the buffer's (tp, B, s) order, contiguous as they
            # landed; every op here is row-local, so only the outputs are permuted into place.
            for w, o, mm in zip(operands, outs, gemms):
                o[:, :, c] = (
                    mm.fprop(bufs[c].view(-1, D), w, out_dtype).view(tp, B, s, -1).permute(1, 0, 2, 3)
                )
            work = nxt
        ctx.group, ctx.n_chunks, ctx.gemms, ctx.out_dtype = group, n_chunks, gemms, out_dtype
        ctx.save_for_backward(x_full.view(B, tp * S, D), *weights)
        return tuple(o.view(B, tp * S, -1) for o in outs)

    @staticmethod
    @autocast_off
    def backward(ctx, *grads):
        x_full, *masters = ctx.saved_tensors
        weights = [mm.weight_operand(w, ctx.out_dtype) for w, mm in zip(masters, ctx.gemms)]
        group, n = ctx.group, ctx.n_chunks
        tp = group_size(group)
        B, T, D = x_full.shape
        S, s = T // tp, T // tp // n
        live = [(g, w, mm) for g, w, mm in zip(grads, weights, ctx.gemms) if g is not None]
        recvs, works = [], []
        for c in range(n):
            gc = sum(
                mm.dgrad(g.view(B, tp, n, s, -1)[:, :, c].reshape(B * tp * s, -1), w, x_full.dtype)
                for g, w, mm in live
            ).view(B, tp, s, D)
            recvs.append(x_full.new_empty(B, s, D))
            works.append(
                reduce_scatter_single(
                    recvs[c], gc.permute(1, 0, 2, 3).reshape(tp * B, s, D), group=group, async_op=True
                )
            )
        x2 = x_full.reshape(-1, D)
        dws = [
            None if g is None else mm.wgrad(g.reshape(-1, g.shape[-1]), x2, w.dtype)
            for g, w, mm in zip(grads, masters, ctx.gemms)
        ]
        for w in works:
            w.wait()
        return (torch.cat(recvs, dim=1).view(B, S, D), None, None, None, None, *dws)


class MatmulReduceScatter(torch.autograd.Function):
    """Forward: y = reduce_scatter(x @ W.T) with chunk c's reduce-scatter in flight during chunk c+1's
    GEMM. Backward: all-gather dy chunk by chunk, dx = dy @ W per chunk as it lands, dW = dy.T @ x.

    x: [B, T, F_l] (full sequence, local input features, in the GEMM dtype); W: [D, F_l] (master).
    Returns [B, T/tp, D] in out_dtype. `gemms` runs W's three GEMMs (see AllGatherMatmul).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, group, n_chunks, gemms, out_dtype, weight):
        tp = group_size(group)
        B, T, Fl = x.shape
        s = T // tp // n_chunks
        xv = x.view(B, tp, n_chunks, s, Fl)
        w = gemms.weight_operand(weight, out_dtype)
        recvs, works = [], []
        for c in range(n_chunks):
            yc = gemms.fprop(xv[:, :, c].reshape(-1, Fl), w, out_dtype).view(B, tp, s, -1)
            yc = yc.permute(1, 0, 2, 3).reshape(tp * B, s, -1)  # [tp*B, s, D]
            recvs.append(x.new_empty(B, s, weight.shape[0], dtype=out_dtype))
            works.append(reduce_scatter_single(recvs[c], yc, group=group, async_op=True))
        for w in works:
            w.wait()
        ctx.group, ctx.n_chunks, ctx.gemms, ctx.out_dtype = group, n_chunks, gemms, out_dtype
        ctx.save_for_backward(x, weight)
        return torch.cat(recvs, dim=1)

    @staticmethod
    @autocast_off
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        w = ctx.gemms.weight_operand(weight, ctx.out_dtype)
        group, n = ctx.group, ctx.n_chunks
        tp = group_size(group)
        B, T, Fl = x.shape
        S = T // tp
        s = S // n
        D = weight.shape[0]
        pieces = [g[:, c * s : (c + 1) * s].contiguous() for c in range(n)]
        bufs = [g.new_empty(tp * B, s, D) for _ in range(n)]
        start = lambda c: all_gather_single(bufs[c], pieces[c], group=group, async_op=True)
        g_full = g.new_empty(B, tp, n, s, D)
        dx = x.new_empty(B, tp, n, s, Fl)
        work = start(0)
        for c in range(n):
            nxt = start(c + 1) if c + 1 < n else None
            work.wait()
            gg = bufs[c].view(tp, B, s, D).permute(1, 0, 2, 3)
            g_full[:, :, c] = gg
            dx[:, :, c] = ctx.gemms.dgrad(gg.reshape(-1, D), w, x.dtype).view(B, tp, s, Fl)
            work = nxt
        dw = ctx.gemms.wgrad(g_full.reshape(-1, D), x.reshape(-1, Fl), weight.dtype)
        return dx.view(B, T, Fl), None, None, None, None, dw
