"""Log-probabilities of labels straight from hidden states and the output weight: what DPO and a
reward model read, `log softmax(hidden @ weight.T)[target]` per token, never holding [N, V] logits.

`linear_logprobs(hidden [N, D], weight [V, D], targets [N])` returns fp32 log p(target) per token
(0 where the target is `ignore_index`), or with `cu_seqlens` the sums over each sequence (packed
rows and one sequence per row give the same sums). Under tensor parallelism `weight` is the rank's
vocabulary shard [V_l, D] starting at `vocab_start`, and `combine_shards` turns the shards' partial
log-sum-exps and target logits into the whole vocabulary's (`llama3hp.parallel.vocab_parallel`
passes three all-reduces on [M] vectors over the TP group: this module knows no process group). The
hidden-state gradient returned is this shard's part (the caller's gather sums it over TP, as for the
vocab-parallel cross-entropy).

How (`LinearLogprobsFunction`):
1. the rows whose target is ignored are dropped BEFORE any GEMM (a DPO batch's prompt tokens, an
   SFT batch's user turns): the M kept rows are gathered once;
2. per chunk of C rows (C x V x 4 bytes <= `chunk_bytes`, whatever N is), logits [C, V] = h @ W.T
   in the GEMM dtype, and `_logprob_fwd_kernel` streams each row once in fp32 with an online
   max/sum-exp: the row's log-sum-exp and its target logit; the chunk's logits are then dropped;
3. backward recomputes each chunk's logits, `_logprob_bwd_kernel` turns them in place into
   dlogits = g * (onehot(target) - softmax), then dh = dlogits @ W and dW += dlogits.T @ h (fp32).
Only fp32 [M] vectors (log-sum-exp, kept-row index) are saved between forward and backward.

Off CUDA `backend="auto"` runs the same chunked Function with torch reductions (also vocab-parallel
under TP): at V = 128,256 on CPU it measured 1.3x faster than the reference and 18% of its extra
memory at 4K tokens (benchmarks/results/cpu/logprobs.md), dropped rows being free. `backend="torch"`
runs the reference (materialised fp32 logits).

Shape legend: N tokens, M kept tokens (target != ignore_index), C rows per chunk, D model dim,
V (local) vocabulary, S sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llama3hp.kernels.cross_entropy import DEFAULT_CHUNK_BYTES, accumulate_grad_weight, chunk_rows
from llama3hp.kernels.dispatch import autocast_off, check_backend, matmul_dtype, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path works without triton
    triton = None


if triton is not None:

    @triton.jit
    def _logprob_fwd_kernel(
        LOGITS,  # [C, V] logits of a chunk (read only)
        stride_l,
        TARGETS,  # [C] int64 target index into this vocabulary shard; outside [0, V): another shard's
        LSE,  # [C] fp32 out: logsumexp over this shard
        TLOGIT,  # [C] fp32 out: the target's logit, 0 when it lies on another shard
        V,
        BLOCK_V: tl.constexpr,
    ):
        """One row: a single pass over V with a running max m and sum of exp(x - m)."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_l
        m = -float("inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        tl.store(LSE + row, m + tl.log(s))
        t = tl.load(TARGETS + row)
        on_shard = (t >= 0) & (t < V)
        x_t = tl.load(base + tl.where(on_shard, t, 0), mask=on_shard, other=0.0).to(tl.float32)
        tl.store(TLOGIT + row, tl.where(on_shard, x_t, 0.0))

    @triton.jit
    def _logprob_bwd_kernel(
        LOGITS,  # [C, V] recomputed logits in; dlogp/dlogits * grad out (in place)
        stride_l,
        TARGETS,  # [C] int64, as in the forward
        LSE,  # [C] fp32 logsumexp over the WHOLE vocabulary (every shard)
        GRAD,  # [C] fp32 gradient of each row's log-probability
        V,
        BLOCK_V: tl.constexpr,
    ):
        """One row: d log p(t) / d x_j = [j == t] - softmax_j, scaled by the row's gradient."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_l
        lse = tl.load(LSE + row)
        g = tl.load(GRAD + row)
        t = tl.load(TARGETS + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            d = g * (tl.where(cols == t, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(base + cols, d.to(LOGITS.dtype.element_ty), mask=mask)


def _block_v(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 16K-wide blocks at LLM vocabularies (8 passes over 128,256 columns)."""
    block = min(triton.next_power_of_2(v), 16384)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _chunk_stats(
    logits: torch.Tensor, local_t: torch.Tensor, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp fp32 [C], target logit fp32 [C], 0 off the shard) of a chunk of logits [C, V]."""
    C, V = logits.shape
    on_shard = (local_t >= 0) & (local_t < V)
    if not fused:
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.logsumexp(x, dim=-1), torch.where(
            on_shard, x.gather(1, local_t.clamp(0, V - 1)[:, None])[:, 0], 0.0
        )
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    t_logit = torch.empty_like(lse)
    if C:
        block, warps = _block_v(V)
        _logprob_fwd_kernel[(C,)](
            logits, logits.stride(0), local_t, lse, t_logit, V, BLOCK_V=block, num_warps=warps
        )
    return lse, t_logit


def _chunk_grad_(
    logits: torch.Tensor, local_t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, fused: bool
):
    """dlogits [C, V] = g * (onehot(t) - softmax) in logits' dtype; in place when fused."""
    C, V = logits.shape
    if not fused:
        d = -torch.exp(logits.to(torch.promote_types(logits.dtype, torch.float32)) - lse[:, None])
        on_shard = (local_t >= 0) & (local_t < V)
        d[on_shard, local_t[on_shard]] += 1.0
        return (d * g[:, None]).to(logits.dtype)
    if C:
        block, warps = _block_v(V)
        _logprob_bwd_kernel[(C,)](
            logits, logits.stride(0), local_t, lse, g, V, BLOCK_V=block, num_warps=warps
        )
    return logits


# (this shard's log-sum-exps [M], its target logits [M]) -> the global log-sum-exps [M], the target
# logits summed over the shards in place (each target lies on one shard).
CombineShards = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LinearLogprobsFunction(torch.autograd.Function):
    """log p(target) [N] fp32 of `hidden [N, D] @ weight [V_l, D].T` (see the module docstring).

    forward(hidden, weight, targets, ignore_index, vocab_start, combine_shards, chunk_rows, fused, mm_dtype):
    GEMMs in mm_dtype with autocast off, forward and backward; gradients in the inputs' dtypes.
    """

    @staticmethod
    @autocast_off
    def forward(
        ctx, hidden, weight, targets, ignore_index, vocab_start, combine_shards, rows, fused, mm_dtype
    ):
        keep = torch.nonzero(targets != ignore_index).squeeze(1)  # the rows left before any GEMM
        h = hidden.index_select(0, keep).to(mm_dtype)
        w = weight.to(mm_dtype)
        local_t = targets.index_select(0, keep) - vocab_start
        M = keep.numel()
        lse_l = torch.empty(M, dtype=torch.float32, device=hidden.device)
        t_logit = torch.empty_like(lse_l)
        for s in range(0, M, rows):
            e = min(s + rows, M)
            logits = h[s:e] @ w.T  # [C, V_l]: the only logits ever held
            lse_l[s:e], t_logit[s:e] = _chunk_stats(logits, local_t[s:e], fused)
        lse = lse_l if combine_shards is None else combine_shards(lse_l, t_logit)
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        out[keep] = t_logit - lse
        ctx.save_for_backward(hidden, weight, keep, local_t, lse)
        ctx.opts = (rows, fused, mm_dtype)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad):
        hidden, weight, keep, local_t, lse = ctx.saved_tensors
        rows, fused, mm_dtype = ctx.opts
        h = hidden.index_select(0, keep).to(mm_dtype)
        w = weight.to(mm_dtype)
        g = grad.float().index_select(0, keep).contiguous()
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, keep.numel(), rows):
            e = min(s + rows, keep.numel())
            d = _chunk_grad_(h[s:e] @ w.T, local_t[s:e], lse[s:e], g[s:e], fused)
            torch.mm(d, w, out=dh[s:e])
            accumulate_grad_weight(dw, d, h[s:e])
        dhidden = torch.zeros_like(hidden)
        dhidden.index_copy_(0, keep, dh.to(hidden.dtype))
        return dhidden, dw.to(weight.dtype), *(None,) * 7


def sequence_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sums [S] of per-token values [N] over the segments of cu_seqlens [S + 1] (differentiable)."""
    cu = cu_seqlens.to(device=values.device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], torch.arange(values.numel(), device=values.device), right=True)
    return values.new_zeros(cu.numel() - 1).index_add(0, seq, values)


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: the materialised fp32 logits' log_softmax at the targets [N] (0 on ignored
    targets), or their sums over cu_seqlens [S]. hidden [N, D]; weight [V, D]; targets [N]."""
    logp = F.log_softmax((hidden @ weight.T).float(), dim=-1)
    valid = targets != ignore_index
    out = torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    return out if cu_seqlens is None else sequence_sums(out, cu_seqlens)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    vocab_start: int = 0,
    combine_shards: CombineShards | None = None,
    chunk_size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
) -> torch.Tensor:
    """log p(target) fp32 [N] (0 where ignored), or its sums over cu_seqlens [S] (see the module
    docstring). hidden [N, D]; weight [V, D], or under TP the shard [V_l, D] of rows [vocab_start,
    vocab_start + V_l) and `combine_shards` combining the shards; targets [N] int. chunk_size: rows per chunk
    (default: as many as keep one chunk's fp32 logits within chunk_bytes)."""
    check_backend(backend)
    if (
        hidden.dim() != 2
        or weight.dim() != 2
        or hidden.shape[1] != weight.shape[1]
        or targets.shape != hidden.shape[:1]
    ):
        raise ValueError(
            f"expected hidden [N, D], weight [V, D] and targets [N], got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    fused = use_triton(backend, hidden, weight, targets)
    if backend == "torch" and combine_shards is None and vocab_start == 0:
        return linear_logprobs_ref(hidden, weight, targets, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
    if combine_shards is None and not targets.is_cuda:  # a host check is free here; on CUDA it would sync
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index, got {targets[bad][0]}"
            )
    mm_dtype = matmul_dtype(hidden)
    rows = chunk_size or chunk_rows(hidden.shape[0], weight.shape[0], 4, chunk_bytes)
    out = LinearLogprobsFunction.apply(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), ignore_index, vocab_start, combine_shards,
        max(1, rows), fused, mm_dtype,
    )  # fmt: skip
    return out if cu_seqlens is None else sequence_sums(out, cu_seqlens)
