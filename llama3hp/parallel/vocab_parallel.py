"""The vocabulary over tensor parallelism: the embedding, the output head and its losses.

The embedding and the head split the vocabulary over the TP ranks: rank r holds rows
[r V/tp, (r+1) V/tp) of each matrix under the parameters' own names. `ParallelHead` replaces the
model's `OutputHead` on a mesh (`apply_tp`), so the model's forward and every objective run
unchanged: its cross-entropy combines the shards' partial log-sum-exps and target logits with
all-reduces over TP, and its per-document sums (`HeadOutput.document_sums`) are all-reduced over
the context-parallel ranks, which hold different tokens of the same documents.

Shape legend: B rows, T tokens per row (after CP), S = T/tp tokens of a sequence shard, D model dim,
V_l local vocabulary shard, N = B*T.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama3hp.kernels.cross_entropy import accumulate_grad_weight, chunk_rows, logits_grad_, logits_lse
from llama3hp.kernels.dispatch import autocast_off, matmul_dtype, use_triton
from llama3hp.kernels.logprobs import linear_logprobs
from llama3hp.model.head import OutputHead, RewardHead, score_matmul
from llama3hp.parallel.comm import all_gather_dim, all_reduce, all_reduced
from llama3hp.parallel.tp_comm import TPComm


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


class AllReduceSum(torch.autograd.Function):
    """Forward: the sum over `group` (every rank gets it). Backward: the sum of the ranks' output
    gradients, since every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduced(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_reduced(g, ctx.group), None


class GatherVocab(torch.autograd.Function):
    """Forward: the vocabulary shards [..., V_l] of every TP rank concatenated into [..., V].
    Backward: this rank's columns of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        return all_gather_dim(x.contiguous(), x.dim() - 1, group)

    @staticmethod
    def backward(ctx, g):
        r = dist.get_rank(ctx.group)
        return g[..., r * ctx.width : (r + 1) * ctx.width], None


class GatherSequence(torch.autograd.Function):
    """Forward: the sequence shards [B, S] of every TP rank concatenated into [B, T]. Backward: this
    rank's columns of the gradient. For values every TP rank then uses identically (a reward head's
    scores: each rank computes the same loss from them, so no rank's gradient is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[1]
        return all_gather_dim(x.contiguous(), 1, group)

    @staticmethod
    def backward(ctx, g):
        r = dist.get_rank(ctx.group)
        return g[:, r * ctx.width : (r + 1) * ctx.width], None


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


class ParallelHead(OutputHead):
    """The output head on a mesh: rows [vocab_start, vocab_start + V_l) of the projection under TP
    (`output.weight` holds the shard), per-document sums reduced over the CP group.

    Loss forms under TP. `tp.chunked_loss` (the default): the gathered rows through
    `VocabParallelLinearCrossEntropy`, never more than one chunk of [N, V_l] logits. Otherwise the
    shard's logits [N, V_l] and `VocabParallelCrossEntropy` (identical on every TP rank). What the
    materialised form costs at 405B (TP8, V_l = 128,256/8 = 16,032, one 8K row per rank:
    N = 8,192): logits 263 MB in bf16, their fp32 copy, exp and the saved fp32 softmax 525 MB each,
    ~1.6 GB at the peak and 525 MB kept until backward; chunked: at most one chunk
    (`kernels.cross_entropy.DEFAULT_CHUNK_BYTES`, 256 MiB) live and 3 fp32 [N] vectors kept, at the
    price of recomputing the head GEMM in backward (+1/3 of the head's FLOPs, ~0.4% of a 405B step).
    """

    def __init__(self, head: OutputHead, tp: TPComm, cp_group: dist.ProcessGroup | None, weight=None):
        if tp.size > 1:
            super().__init__(weight, head.backend)
        else:  # the same matrix (or the same tied embedding) as the one-process head
            super().__init__(None if head._tied else head.weight, head.backend, tied_to=head.tied_embedding)
        self.tp, self.cp_group = tp, cp_group
        self.vocab_start = tp.rank * self.projection().shape[0]

    def cross_entropy(self, h, targets, *, ignore_index, reduction, z_loss_scale):
        """h: [B, S, D] (sequence shard) or [B, T, D]; targets [B, T] (full rows on every TP rank)."""
        if self.tp.size == 1:
            return super().cross_entropy(
                h, targets, ignore_index=ignore_index, reduction=reduction, z_loss_scale=z_loss_scale
            )
        w, tp = self.projection(), self.tp
        t = targets.reshape(-1)
        if tp.chunked_loss:
            dt = matmul_dtype(h)
            x = tp.gather(h.to(dt))  # under autocast the gather moves the GEMM's bf16 rows
            x = x.reshape(-1, x.shape[-1]).contiguous()
            rows = chunk_rows(x.shape[0], w.shape[0], dt.itemsize)
            loss = VocabParallelLinearCrossEntropy.apply(
                x, w, t, self.vocab_start, tp.group, ignore_index, float(z_loss_scale), rows,
                use_triton(self.backend, x, w), dt,
            )  # fmt: skip
        else:
            (logits,) = tp.column(h, [w])
            loss = VocabParallelCrossEntropy.apply(
                logits.reshape(-1, logits.shape[-1]),
                t,
                self.vocab_start,
                tp.group,
                ignore_index,
                z_loss_scale,
            )
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total / (t != ignore_index).sum().clamp(min=1)

    def token_logprobs(self, h, targets, *, ignore_index):
        """h: [B, S, D] (sequence shard) or [B, T, D]; targets [B, T]. Under TP the fused chunked kernel
        on this rank's vocabulary shard, combined over TP (`kernels/logprobs.py`); the gather's backward
        sums the shards' partial dh."""
        if self.tp.size == 1:
            return super().token_logprobs(h, targets, ignore_index=ignore_index)
        w = self.projection()
        x = self.tp.gather(h.to(matmul_dtype(h)))
        x = x.reshape(-1, x.shape[-1])
        return linear_logprobs(
            x, w, targets.reshape(-1), ignore_index=ignore_index, vocab_start=self.vocab_start,
            combine_shards=functools.partial(combine_logprob_shards, group=self.tp.group), backend=self.backend,
        )  # fmt: skip

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, V]: every TP rank's vocabulary shard gathered (for inference and tests)."""
        if self.tp.size == 1:
            return super().logits(h)
        (shard,) = self.tp.column(h, [self.projection()])
        return GatherVocab.apply(shard, self.tp.group)

    def reduce_documents(self, sums: torch.Tensor) -> torch.Tensor:
        return sums if self.cp_group is None else AllReduceSum.apply(sums, self.cp_group)


def combine_logprob_shards(lse_l: torch.Tensor, t_logit: torch.Tensor, group) -> torch.Tensor:
    """The fused log-probabilities' shard combination over TP (`kernels/logprobs.py`): the global
    log-sum-exp [M] (m = max over shards; lse = m + log sum exp(lse_r - m)), and the target logits
    summed in place (each lies on one shard). Three all-reduces on [M] vectors."""
    m = lse_l.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(lse_l - m)
    dist.all_reduce(s, group=group)
    dist.all_reduce(t_logit, group=group)
    return m + torch.log(s)


class ParallelRewardHead(RewardHead):
    """A reward model's head on a mesh: the [1, D] row (`output.score`, the same Parameter) replicated
    over TP, per-document sums reduced over the CP group.

    Under sequence parallelism each TP rank scores its own sequence shard and the [B, S] scores are
    gathered (`GatherSequence`, backward: this rank's slice), so the row's gradient on a rank is the
    partial sum over its shard, reduced over TP by the data-parallel wrapper like the norms'. Without
    it the hidden states are whole on every rank and so is the gradient."""

    def __init__(self, head: RewardHead, tp: TPComm, cp_group: dist.ProcessGroup | None):
        super().__init__(head.score)
        self.tp, self.cp_group = tp, cp_group

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, S, D] (sequence shard) or [B, T, D] -> fp32 [B*T], the rows' tokens in order."""
        s = score_matmul(h, self.score).squeeze(-1)
        if self.tp.size > 1 and self.tp.sequence_parallel:
            s = GatherSequence.apply(s, self.tp.group)
        return s.reshape(-1)

    def reduce_documents(self, sums: torch.Tensor) -> torch.Tensor:
        return sums if self.cp_group is None else AllReduceSum.apply(sums, self.cp_group)
