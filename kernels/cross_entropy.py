"""Linear cross-entropy: the loss of `hidden @ weight.T` against targets.

The reference materialises the logits (in fp32); the fused kernel computes the same loss and the
gradients of hidden and weight chunk by chunk without ever holding [N, V] logits.
Conventions shared by every implementation:
- targets equal to `ignore_index` contribute nothing (not to the loss, not to the count);
- reduction "mean" divides by the number of non-ignored targets (0 if there are none),
  "sum" adds, "none" returns one loss per row (0 on ignored rows);
- z-loss (PaLM): `z_loss_scale * logsumexp(logits)^2` is added per non-ignored row.

Fused path, per chunk of C rows (C chosen so a chunk's logits take at most `chunk_bytes`):
1. logits [C, V] = hidden_chunk @ weight.T (a torch GEMM in the input dtype);
2. one Triton program per row (several for small vocabularies) streams it twice in fp32: an online max/sum-exp pass gives
   logsumexp and the loss, a second pass overwrites the logits with dloss/dlogits;
3. grad_hidden[chunk] = dlogits @ weight, grad_weight += dlogits.T @ hidden_chunk (fp32 sum).
For "mean"/"sum" all of this happens in forward and backward only scales the stored gradients
by the scalar grad_output. For "none" each row has its own grad_output, which must weight that
row's dlogits before they are summed into grad_weight: forward then computes the loss only and
backward recomputes the logits chunk by chunk with the per-row scale (reusing the saved
logsumexp, so each row is read once).
Out-of-range targets: a clear error on CPU; on CUDA (no host sync) the row's loss is NaN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import autocast_off, check_backend, matmul_dtype, use_triton

REDUCTIONS = ("mean", "sum", "none")
# Bytes of one chunk's logits: 256 MiB is ~1,024 rows of a 128,256 vocabulary in bf16, large
# enough for full-speed GEMMs while the peak stays a small fraction of the [N, V] fp32 logits.
DEFAULT_CHUNK_BYTES = 256 * 2**20


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS,  # [C, V] logits in; dloss/dlogits out (when COMPUTE_GRAD)
    stride_l,
    TARGETS,  # [C] integer
    LOSS,  # [C] fp32 per-row loss (written when not HAS_LSE)
    LSE,  # [C] fp32 logsumexp: written, or read when HAS_LSE
    SCALE,  # fp32 gradient scale per row: SCALE[row * stride_s] (stride 0 for one scalar)
    stride_s,
    C,
    V,
    ignore_index,
    z_loss_scale,
    COMPUTE_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < C
    base = LOGITS + rows[:, None] * stride_l
    target = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = (target != ignore_index) & row_mask
    if HAS_LSE:
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    else:
        # Online softmax: running max m and sum of exp(x - m), rescaled when the max grows.
        m = tl.full([BLOCK_R], -float("inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_R], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            x = tl.load(base + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
            # Padding rows are all -inf: keep their max finite so exp() never sees -inf - -inf.
            m_new = tl.maximum(tl.maximum(m, tl.max(x, axis=1)), -1e30)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        lse = tl.where(row_mask, m + tl.log(tl.where(row_mask, s, 1.0)), 0.0)  # padding rows: finite, unused
        in_range = (target >= 0) & (target < V)
        safe_target = tl.where(in_range, target, 0)
        x_target = tl.load(LOGITS + rows * stride_l + safe_target, mask=valid & in_range, other=0.0).to(
            tl.float32
        )
        loss = lse - x_target + z_loss_scale * lse * lse
        loss = tl.where(in_range, loss, float("nan"))
        tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=row_mask)
        tl.store(LSE + rows, lse, mask=row_mask)
    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(SCALE + rows * stride_s, mask=row_mask, other=0.0), 0.0)
        # d/dx_j [lse - x_t + z lse^2] = softmax_j * (1 + 2 z lse) - [j == t]
        p_scale = (scale * (1.0 + 2.0 * z_loss_scale * lse))[:, None]
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.exp(x - lse[:, None]) * p_scale - tl.where(
                cols[None, :] == target[:, None], scale[:, None], 0.0
            )
            tl.store(base + cols[None, :], d.to(LOGITS.dtype.element_ty), mask=mask)


def _launch_config(v: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps): one row per program at LLM vocabularies (16K-wide blocks),
    several rows per program for small vocabularies so a tile still holds ~8K elements."""
    block_v = min(triton.next_power_of_2(v), 16384)
    block_r = max(1, 8192 // block_v)
    tile = block_r * block_v
    return block_r, block_v, (4 if tile <= 2048 else 8 if tile <= 8192 else 16)


def chunk_rows(n: int, v: int, itemsize: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk of n so that one chunk's [rows, v] logits of `itemsize` bytes fit `chunk_bytes`."""
    rows = max(1, chunk_bytes // (v * itemsize))
    if rows >= 256:
        rows -= rows % 256  # whole GEMM tiles
    return max(1, min(rows, n))


@functools.cache
def _fp32_out_addmm_ok(device_type: str, dtype: torch.dtype) -> bool:
    """Whether addmm can take low-precision operands into an fp32 accumulator in place (cuBLAS can)."""
    try:
        a = torch.randn(16, 8, device=device_type, dtype=dtype)
        b = torch.randn(8, 4, device=device_type, dtype=dtype)
        acc = torch.ones(16, 4, device=device_type, dtype=torch.float32)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return torch.allclose(acc, 1.0 + a.float() @ b.float(), rtol=1e-2, atol=1e-2)


def accumulate_grad_weight(gw32: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """gw32 [V, D] fp32 += dlogits.T [V, C] @ h [C, D], the product summed in fp32."""
    if dlogits.dtype == torch.float32:
        gw32.addmm_(dlogits.T, h)
    elif _fp32_out_addmm_ok(gw32.device.type, dlogits.dtype):
        torch.addmm(gw32, dlogits.T, h, out_dtype=torch.float32, out=gw32)
    else:
        gw32.add_(dlogits.T @ h)


def _run_chunks(hidden, weight, targets, *, ignore_index, z_loss_scale, chunk_rows, scale, stride_s, lse, loss,
                need_gh, need_gw, has_lse):  # fmt: skip
    """The chunk loop shared by forward ("mean"/"sum") and the recomputing backward ("none").

    Returns (grad_hidden [N, D] in hidden's dtype or None, grad_weight [V, D] fp32 or None).
    """
    n, v = hidden.shape[0], weight.shape[0]
    compute_grad = need_gh or need_gw
    gh = torch.empty_like(hidden) if need_gh else None
    gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_gw else None
    block_r, block_v, num_warps = _launch_config(v)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        h = hidden[s:e]
        logits = h @ weight.T  # [c, V] in the input dtype
        _cross_entropy_fwd_kernel[(triton.cdiv(e - s, block_r),)](
            logits, logits.stride(0), targets[s:e], loss[s:e], lse[s:e], scale[s * stride_s :], stride_s,
            e - s, v, ignore_index, z_loss_scale,
            COMPUTE_GRAD=compute_grad, HAS_LSE=has_lse, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
        if need_gh:
            torch.mm(logits, weight, out=gh[s:e])
        if need_gw:
            accumulate_grad_weight(gw32, logits, h)
    return gh, gw32


def logits_lse(logits: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """fp32 logsumexp [C] of a chunk of logits [C, V] (a vocabulary shard's under TP): the fused kernel's
    first pass when `fused`, else torch."""
    if not fused:
        return torch.logsumexp(logits.float(), dim=-1)
    C, V = logits.shape
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    loss = torch.empty_like(lse)  # written by the kernel, unused: targets are all ignored here
    ignored = torch.full((C,), -1, dtype=torch.int64, device=logits.device)
    block_r, block_v, warps = _launch_config(V)
    _cross_entropy_fwd_kernel[((C + block_r - 1) // block_r,)](
        logits, logits.stride(0), ignored, loss, lse, lse, 0, C, V, -1, 0.0,
        COMPUTE_GRAD=False, HAS_LSE=False, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return lse


def logits_grad_(
    logits: torch.Tensor, targets, lse, scale, *, ignore_index: int, z_loss_scale: float, fused: bool
) -> torch.Tensor:
    """dloss/dlogits [C, V] of a chunk of logits given its logsumexp lse [C] (under TP the GLOBAL one,
    over every shard) and a per-row scale [C]; a target outside [0, V) (under TP: another shard's)
    matches no column, ignore_index rows get 0. Overwrites and returns `logits` when fused (the kernel's second
    pass), else a new tensor in logits' dtype."""
    if fused:
        C, V = logits.shape
        block_r, block_v, warps = _launch_config(V)
        _cross_entropy_fwd_kernel[((C + block_r - 1) // block_r,)](
            logits, logits.stride(0), targets, lse, lse, scale, 1, C, V, ignore_index, z_loss_scale,
            COMPUTE_GRAD=True, HAS_LSE=True, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
        )  # fmt: skip
        return logits
    valid = targets != ignore_index
    row = torch.where(valid, scale, 0.0)
    d = torch.exp(logits.float() - lse[:, None]) * (row * (1.0 + 2.0 * z_loss_scale * lse))[:, None]
    hit = valid & (targets >= 0) & (targets < logits.shape[1])
    d[hit, targets[hit]] -= row[hit]
    return d.to(logits.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused `cross_entropy(hidden [N, D] @ weight [V, D].T, targets [N])` (see module docstring).

    forward(hidden, weight, targets, ignore_index, reduction, z_loss_scale, chunk_rows, need_gh, need_gw,
    mm_dtype) -> fp32 loss: a scalar, or [N] with reduction "none". The GEMMs run in mm_dtype (autocast's
    dtype under autocast) with autocast off, forward and backward; grads return in the inputs' dtypes.
    """

    @staticmethod
    @autocast_off
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        ignore_index,
        reduction,
        z_loss_scale,
        chunk_rows,
        need_gh,
        need_gw,
        mm_dtype,
    ):
        n, dev = hidden.shape[0], hidden.device
        loss = torch.empty(n, dtype=torch.float32, device=dev)
        lse = torch.empty(n, dtype=torch.float32, device=dev)
        n_valid = (targets != ignore_index).sum()
        eager_grads = reduction != "none" and (need_gh or need_gw)
        if reduction == "mean":
            scale = (1.0 / n_valid.clamp(min=1)).to(torch.float32).reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=dev)
        gh, gw32 = _run_chunks(
            hidden.to(mm_dtype), weight.to(mm_dtype), targets, ignore_index=ignore_index,
            z_loss_scale=z_loss_scale, chunk_rows=chunk_rows, scale=scale, stride_s=0, lse=lse, loss=loss,
            need_gh=need_gh and eager_grads, need_gw=need_gw and eager_grads, has_lse=False,
        )  # fmt: skip
        ctx.reduction = reduction
        ctx.need = (need_gh, need_gw)
        ctx.dtypes = (hidden.dtype, weight.dtype, mm_dtype)
        if reduction == "none":
            # The inputs as given (the matmul-dtype copies are remade in backward, not kept alive).
            ctx.save_for_backward(hidden, weight, targets, lse)
            ctx.options = (ignore_index, z_loss_scale, chunk_rows)
            return loss
        ctx.save_for_backward(gh, gw32.to(weight.dtype) if gw32 is not None else None)
        total = loss.sum()
        return total / n_valid.clamp(min=1) if reduction == "mean" else total

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        need_gh, need_gw = ctx.need
        h_dtype, w_dtype, mm_dtype = ctx.dtypes
        none = (None,) * 8
        if ctx.reduction != "none":
            gh, gw = ctx.saved_tensors
            # The stored gradients are d(loss)/d(.) for grad_output 1: scale by the scalar.
            gh = (gh * grad_loss.to(gh.dtype)).to(h_dtype) if need_gh else None
            gw = gw * grad_loss.to(gw.dtype) if need_gw else None
            return gh, gw, *none
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, z_loss_scale, chunk_rows = ctx.options
        scale = grad_loss.to(torch.float32).contiguous()  # [N]: one scale per row
        gh, gw32 = _run_chunks(
            hidden.to(mm_dtype), weight.to(mm_dtype), targets, ignore_index=ignore_index,
            z_loss_scale=z_loss_scale, chunk_rows=chunk_rows, scale=scale, stride_s=1, lse=lse, loss=lse,
            need_gh=need_gh, need_gw=need_gw, has_lse=True,
        )  # fmt: skip
        gh = gh.to(h_dtype) if gh is not None else None
        gw = gw32.to(w_dtype) if gw32 is not None else None
        return gh, gw, *none


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss_scale: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch reference. hidden: [N, D]; weight: [V, D]; targets: [N] int. fp32 loss."""
    _check(hidden, weight, targets, reduction)
    logits = (hidden @ weight.T).float()
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if z_loss_scale:
        loss = loss + z_loss_scale * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss_scale: float = 0.0,
    chunk_size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` (see module docstring). hidden: [N, D]; weight: [V, D].

    chunk_size: rows per chunk for the fused path (default: as many as fit in chunk_bytes of logits).
    """
    check_backend(backend)
    _check(hidden, weight, targets, reduction)
    if not use_triton(backend, hidden, weight, targets):
        return linear_cross_entropy_ref(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, z_loss_scale=z_loss_scale
        )
    # Under autocast the logits GEMMs run in autocast's dtype, like the nn.Linear they replace;
    # otherwise hidden and weight must agree.
    autocast_on = torch.is_autocast_enabled(hidden.device.type)
    if (not autocast_on and hidden.dtype != weight.dtype) or targets.is_floating_point():
        raise ValueError(
            f"expected hidden and weight of one dtype (or autocast on) and integer targets, got {hidden.dtype}, "
            f"{weight.dtype}, {targets.dtype}"
        )
    mm_dtype = matmul_dtype(hidden)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    n, v = hidden.shape[0], weight.shape[0]
    if not targets.is_cuda:  # a host check costs nothing here; on CUDA it would sync every step
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            raise ValueError(
                f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}, got {targets[bad][0].item()}"
            )
    rows = chunk_size or chunk_rows(n, v, mm_dtype.itemsize, chunk_bytes)
    grad = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), ignore_index, reduction, float(z_loss_scale),
        max(1, min(rows, max(n, 1))), grad and hidden.requires_grad, grad and weight.requires_grad, mm_dtype,
    )  # fmt: skip
