"""Tensor parallelism with sequence parallelism (Megatron-LM style), applied to a built model.

Column-parallel linears (wq, wk, wv, w1, w3, the output head) split output features over the TP
ranks, row-parallel linears (wo, w2) split input features; the embedding and the head split the
vocabulary. With sequence parallelism the residual stream and the norms live on sequence shards
[B, T/tp, D]: an all-gather before the column linears, a reduce-scatter after the row linears.
Without it they are replicated and the conjugate f/g operators (identity / all-reduce) are used.

`tp_overlap` replaces "all-gather, then GEMM" by `AllGatherMatmul` (and "GEMM, then reduce-scatter"
by `MatmulReduceScatter`): the sequence shard is cut into chunks whose collectives are launched
asynchronously and pipelined with the GEMMs of the previous chunk (async TP / userbuffers idea).
Both paths compute the same rows with the same GEMMs, so results agree to float32 rounding.

FP8: the parallel blocks call the model's linear modules, so an `llama3hp.fp8.Fp8Linear` (converted
before `apply_tp`, which then shards its weight) runs its FP8 GEMMs on the shard; the overlapped paths
run its `Fp8Gemms` chunk by chunk, which give the same rows as the whole GEMM. Scales follow each
GEMM's reduction dim, so where that dim is split over TP (a row-parallel forward, a column-parallel
input gradient) they are per shard: finer than one process's, equal to FP8 tolerance.

Shape legend: B rows, T tokens per row (after CP), S = T/tp tokens of a sequence shard, D model dim,
O output features of a local shard, V_l local vocabulary shard, N = B*T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import llama3hp.kernels as K
from llama3hp.kernels.cross_entropy import accumulate_grad_weight, chunk_rows, logits_grad_, logits_lse
from llama3hp.kernels.dispatch import autocast_off, matmul_dtype, use_triton
from llama3hp.model.llama import CatCast, groupable, grouped_linear
from llama3hp.parallel.comm import (
    all_gather_dim,
    all_gather_single,
    all_reduce,
    group_rank,
    group_size,
    reduce_scatter_dim,
    reduce_scatter_single,
)

# ---------------------------------------------------------------------------------------------
# Named communication operators


class CopyToTP(torch.autograd.Function):
    """f: forward identity, backward all-reduce over TP (input of column linears without SP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        all_reduce(g, ctx.group)
        return g, None


class ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce over TP, backward identity (output of row linears without SP)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        all_reduce(x, group)
        return x

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


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits split over the vocabulary: the max, the sum of exponentials and
    the target logit are all-reduced over TP; backward is local (softmax - one-hot on the shard).

    logits: [N, V_l] (this rank's vocabulary slice starting at vocab_start); targets: [N].
    Returns the fp32 per-row loss [N] (0 on ignored rows), z-loss included.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, ignore_index, z_loss_scale):
        x = logits.float()
        m = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m[:, None])
        sum_e = e.sum(-1)
        all_reduce(sum_e, group)
        lse = m + torch.log(sum_e)
        local_t = targets - vocab_start
        on_shard = (local_t >= 0) & (local_t < x.shape[1])
        idx = torch.where(on_shard, local_t, 0)
        t_logit = torch.where(on_shard, x.gather(1, idx[:, None])[:, 0], 0.0)
        all_reduce(t_logit, group)
        valid = targets != ignore_index
        loss = torch.where(valid, lse - t_logit + z_loss_scale * lse * lse, 0.0)
        ctx.save_for_backward(e / sum_e[:, None], lse, idx, on_shard, valid)
        ctx.z, ctx.dtype = z_loss_scale, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, lse, idx, on_shard, valid = ctx.saved_tensors
        d = softmax * (1.0 + 2.0 * ctx.z * lse)[:, None]
        d.scatter_add_(1, idx[:, None], -on_shard.to(d.dtype)[:, None])
        d *= (g * valid)[:, None]
        return d.to(ctx.dtype), None, None, None, None, None


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The vocab-parallel loss of `h @ W_l.T` computed chunk by chunk of rows: per chunk the shard's
    logits [C, V_l] are formed, reduced to (shard logsumexp, target logit) and dropped; three
    all-reduces over TP on [N] vectors combine the shards (max, sum of exp, target logit). Backward
    recomputes each chunk's logits and turns them into dlogits with the GLOBAL logsumexp, then
    dh_partial = dlogits @ W_l (summed over TP by the caller's gather's backward) and
    dW_l += dlogits.T @ h (fp32). On CUDA the per-chunk reductions and dlogits are the fused
    cross-entropy kernel's (`kernels/cross_entropy.py`, run on one vocabulary shard); elsewhere the
    same math in torch.

    h: [N, D] full rows (replicated over TP); weight: [V_l, D] rows [vocab_start, vocab_start + V_l);
    targets: [N]; mm_dtype: the GEMMs' dtype (autocast's under autocast: the weight is cast to it in
    forward and again in backward, which run with autocast off). Returns the fp32 per-row loss [N]
    (0 on ignored rows), z-loss included.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, h_in, weight_in, targets, vocab_start, group, ignore_index, z_loss_scale, chunk_rows, fused,
                 mm_dtype):  # fmt: skip
        h, weight = h_in.to(mm_dtype), weight_in.to(mm_dtype)
        N, Vl = h.shape[0], weight.shape[0]
        lse_l = torch.empty(N, dtype=torch.float32, device=h.device)
        t_logit = torch.zeros(N, dtype=torch.float32, device=h.device)
        local_t = targets - vocab_start
        on_shard = (local_t >= 0) & (local_t < Vl)
        idx = torch.where(on_shard, local_t, 0)
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            logits = h[s:e] @ weight.T  # [C, V_l], the only logits ever held
            lse_l[s:e] = logits_lse(logits, fused=fused)
            t_logit[s:e] = torch.where(on_shard[s:e], logits.gather(1, idx[s:e, None])[:, 0].float(), 0.0)
        # Combine the shards' logsumexps: lse = M + log(sum_r exp(lse_r - M)), M the max over TP.
        m = lse_l.clone()
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        sum_e = torch.exp(lse_l - m)
        all_reduce(sum_e, group)
        all_reduce(t_logit, group)
        lse = m + torch.log(sum_e)
        valid = targets != ignore_index
        loss = torch.where(valid, lse - t_logit + z_loss_scale * lse * lse, 0.0)
        # Off-shard (and ignored) targets point past the shard: no column matches them.
        grad_t = torch.where(valid, torch.where(on_shard, local_t, Vl), ignore_index)
        ctx.save_for_backward(h_in, weight_in, grad_t, lse)
        ctx.opts = (ignore_index, z_loss_scale, chunk_rows, fused, mm_dtype)
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, g):
        h_in, weight_in, grad_t, lse = ctx.saved_tensors
        ignore_index, z, chunk_rows, fused, mm_dtype = ctx.opts
        h, weight = h_in.to(mm_dtype), weight_in.to(mm_dtype)
        N = h.shape[0]
        scale = g.float().contiguous()
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            logits = h[s:e] @ weight.T
            d = logits_grad_(
                logits,
                grad_t[s:e],
                lse[s:e],
                scale[s:e],
                ignore_index=ignore_index,
                z_loss_scale=z,
                fused=fused,
            )
            torch.mm(d, weight, out=dh[s:e])
            accumulate_grad_weight(dw, d, h[s:e])
        return dh.to(h_in.dtype), dw.to(weight_in.dtype), *(None,) * 9


# ---------------------------------------------------------------------------------------------
# The TP communication plan a module calls

# What TPComm multiplies by: a linear module (nn.Linear, or its FP8 subclass, whose own forward then
# runs) or a bare weight [O, D] (the output head, called through its weight).
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
            y = self.column_grouped(x, linears)
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

    def column_grouped(self, x: torch.Tensor, linears: list[Linear]) -> torch.Tensor:
        """`llama3hp.model.llama.grouped_linear` over the local shards of `groupable` column linears:
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


# ---------------------------------------------------------------------------------------------
# Modules that replace the model's (same parameter names, so state dicts keep their FQNs)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V_l) of the embedding; tokens outside contribute zeros."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, tp: TPComm):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vocab_start, self.tp = vocab_start, tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> [B, S, D] under SP, else [B, T, D]."""
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(torch.where(inside, local, 0), self.weight) * inside[..., None].to(self.weight.dtype)
        return self.tp.reduce_partial(h)


class ParallelAttention(nn.Module):
    """The model's attention with TP-sharded heads and optional context parallelism (cp: CPComm)."""

    def __init__(self, attn: nn.Module, tp: TPComm, cp=None):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = attn.wq, attn.wk, attn.wv, attn.wo
        self.head_dim, self.kernels = attn.head_dim, attn.kernels
        self.tp, self.cp = tp, cp

    def forward(self, x, positions_BT, inv_freq, cu_seqlens, max_seqlen):
        """x: [B, S, D] (SP) or [B, T, D]; positions_BT: [B, T] global RoPE positions of local tokens."""
        q, k, v = self.tp.column(x, [self.wq, self.wk, self.wv], grouped=True)
        B, T = q.shape[:2]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        q, k = K.apply_rope(q, k, positions_BT, inv_freq, backend=self.kernels.rope)
        if self.cp is not None and self.cp.size > 1:
            o = self.cp.attention(q, k, v, cu_seqlens, backend=self.kernels.attention)
        else:
            o = K.attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, backend=self.kernels.attention)
        return self.tp.row(o.reshape(B, T, -1), self.wo)


class ParallelFeedForward(nn.Module):
    """SwiGLU with w1/w3 column-parallel (one grouped GEMM over their local shards where they are
    groupable, as in the one-process model) and w2 row-parallel."""

    def __init__(self, ffn: nn.Module, tp: TPComm):
        super().__init__()
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3
        self.backend, self.tp = ffn.backend, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if groupable([self.w1, self.w3]):
            h = K.swiglu_packed(self.tp.column_grouped(x, [self.w1, self.w3]), backend=self.backend)
        else:
            h = K.swiglu(*self.tp.column(x, [self.w1, self.w3]), backend=self.backend)
        return self.tp.row(h, self.w2)


def _shard(p: torch.Tensor, dim: int, tp: TPComm) -> nn.Parameter:
    if p.shape[dim] % tp.size:
        raise ValueError(f"cannot split a dimension of size {p.shape[dim]} over tp={tp.size} ranks")
    piece = nn.Parameter(p.detach().chunk(tp.size, dim=dim)[tp.rank].clone())
    piece._tp_dim = dim  # which dimension is split over TP (gathering a full state dict reads it)
    return piece


def apply_tp(model: nn.Module, tp: TPComm, cp=None) -> nn.Module:
    """Shard a materialised Transformer's weights over TP in place and swap in the parallel modules.

    Parameter names are unchanged. Replicated parameters (the norms) get `_tp_dim = None`; under
    sequence parallelism their gradients are partial sums over sequence shards, reduced by the
    data-parallel wrapper. Call with tp.size == 1 to only install context parallelism.
    """
    if model.args.tie_embeddings and tp.size > 1:
        raise ValueError("tensor parallelism with tied embeddings is not supported: use an untied preset")
    for layer in model.layers.values():
        a, f = layer.attention, layer.feed_forward
        if tp.size > 1:
            for lin, dim in ((a.wq, 0), (a.wk, 0), (a.wv, 0), (a.wo, 1), (f.w1, 0), (f.w3, 0), (f.w2, 1)):
                lin.weight = _shard(lin.weight, dim, tp)
        layer.attention = ParallelAttention(a, tp, cp)
        layer.feed_forward = ParallelFeedForward(f, tp)
    if tp.size > 1:
        if model.tok_embeddings is not None:
            w = _shard(model.tok_embeddings.weight, 0, tp)
            model.tok_embeddings = VocabParallelEmbedding(w, tp.rank * w.shape[0], tp)
            model.tok_embeddings.weight._tp_dim = 0
        if model.output is not None:
            model.output.weight = _shard(model.output.weight, 0, tp)
    for p in model.parameters():
        if not hasattr(p, "_tp_dim"):
            p._tp_dim = None
    return model


def compute_loss(
    model: nn.Module,
    h: torch.Tensor,
    targets: torch.Tensor,
    tp: TPComm,
    *,
    ignore_index: int = -100,
    z_loss_scale: float = 0.0,
) -> torch.Tensor:
    """Summed fp32 loss of the final hidden states h [B, S or T, D] against targets [B, T].

    One TP rank: the fused linear cross-entropy kernel. TP with `tp.chunked_loss`: the gathered
    rows through `VocabParallelLinearCrossEntropy` (never more than one chunk of [N, V_l] logits).
    Otherwise logits per vocabulary shard [N, V_l] and `VocabParallelCrossEntropy` (identical on every
    TP rank). What the materialised form costs at 405B (TP8, V_l = 128,256/8 = 16,032, one 8K row
    per rank: N = 8,192): logits 263 MB in bf16, their fp32 copy, exp and the saved fp32 softmax
    525 MB each, ~1.6 GB at the peak and 525 MB kept until backward; chunked: at most one chunk
    (`kernels.cross_entropy.DEFAULT_CHUNK_BYTES`, 256 MiB) live and 3 fp32 [N] vectors kept, at the
    price of recomputing the head GEMM in backward (+1/3 of the head's FLOPs, ~0.4% of a 405B step).
    """
    w = model.head_weight()
    backend = model.args.kernels.cross_entropy
    if tp.size == 1:
        return K.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), w, targets.reshape(-1), ignore_index=ignore_index,
            reduction="sum", z_loss_scale=z_loss_scale, backend=backend,
        )  # fmt: skip
    if tp.chunked_loss:
        dt = matmul_dtype(h)
        x = tp.gather(h.to(dt))  # under autocast the gather moves the GEMM's bf16 rows
        x = x.reshape(-1, x.shape[-1]).contiguous()
        rows = chunk_rows(x.shape[0], w.shape[0], dt.itemsize)
        loss = VocabParallelLinearCrossEntropy.apply(
            x, w, targets.reshape(-1), tp.rank * w.shape[0], tp.group, ignore_index, float(z_loss_scale),
            rows, use_triton(backend, x, w), dt,
        )  # fmt: skip
        return loss.sum()
    (logits,) = tp.column(h, [w])
    loss = VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), tp.rank * w.shape[0], tp.group,
        ignore_index, z_loss_scale,
    )  # fmt: skip
    return loss.sum()
