"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

Math convention (shared by every implementation): upcast x to fp32, normalise, multiply by the
fp32 weight, cast once to the output dtype (x's, or `out_dtype`: under autocast the model asks for
autocast's dtype, which is what the next linear would cast to anyway, so the fp32 copy and the
per-linear casts never exist). The fused residual variant first forms h = x + residual in the
promoted dtype of the two (torch's `x + residual`: an fp32 residual stream plus a bf16 branch output
stays fp32), the value handed to the next residual, and normalises that rounded h.

Triton path: a row lives whole in registers (widths up to 65,536): one row per program for wide
rows, several rows per program for narrow ones. Backward runs a persistent grid (a few programs
per SM) where each program walks row blocks and keeps its dweight partial sum in fp32 registers;
the [programs, D] partials are summed afterwards.
Shapes: M rows (all leading dims flattened), N = D features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton

MAX_WIDTH = 65536  # one row must fit in a program's registers


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # [M, N] input
    R,  # [M, N] residual (read only when HAS_RESIDUAL)
    W,  # [N] weight
    Y,  # [M, N] output
    H,  # [M, N] x + residual (written only when HAS_RESIDUAL)
    RSTD,  # [M] fp32, saved for backward
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    rows2, cols2 = rows[:, None], cols[None, :]
    x = tl.load(X + rows2 * stride_x + cols2, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + rows2 * stride_r + cols2, mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + rows2 * stride_h + cols2, h, mask=mask)
        # Normalise the rounded h, so y == rms_norm(h) for the h we return (and backward, which
        # reloads h, differentiates the same function).
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows2 * stride_y + cols2, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    X,  # [M, N] the normalised input (h for the residual variant)
    W,  # [N]
    DY,  # [M, N]
    DH,  # [M, N] gradient arriving at h (read only when HAS_DH)
    RSTD,  # [M] fp32
    DX,  # [M, N]
    DX2,  # [M, N] the same gradient in a second dtype (written only when HAS_DX2)
    DW_PARTIAL,  # [programs, N] fp32
    stride_x,
    stride_dy,
    stride_dh,
    stride_dx,
    stride_dx2,
    M,
    N,
    HAS_DH: tl.constexpr,
    HAS_DX2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cols2 = cols[None, :]
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Persistent grid: program p takes row blocks p, p + programs, ... and keeps its dweight
    # partial in registers, so dweight costs one [programs, N] store instead of an [M, N] one.
    for block in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * stride
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows2 = rows[:, None]
        x = tl.load(X + rows2 * stride_x + cols2, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows2 * stride_dy + cols2, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        xhat = x * rstd
        # Order matters at wide rows (16,384 values a row is 32 fp32 values a thread per tensor):
        # fold dy into dweight and into w*dy first, so only xhat, w*dy and the dweight partial are
        # live across the row reduction (holding x, dy and w too spilled registers).
        dw += dy * xhat
        wdy = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :] * dy
        # d/dx of x*rstd*w: rstd * (w*dy - xhat * mean(xhat * w*dy))
        c = tl.sum(xhat * wdy, axis=1)[:, None] / N
        dx = (wdy - xhat * c) * rstd
        if HAS_DH:
            dx += tl.load(DH + rows2 * stride_dh + cols2, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows2 * stride_dx + cols2, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:  # a mixed-dtype residual add: each input gets dL/dh in its own dtype
            tl.store(DX2 + rows2 * stride_dx2 + cols2, dx.to(DX2.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw, axis=0), mask=col_mask)


def _launch_config(m: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for M rows of N features.

    One row per program from N = 4,096 up (8-16 fp32 values per thread); narrower rows are
    packed several to a program so a tile still holds ~4,096 elements.
    """
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(triton.next_power_of_2(max(m, 1)), 4096 // block_n))
    tile = block_m * block_n
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16 if tile <= 16384 else 32
    return block_m, block_n, num_warps


def _bwd_programs(x: torch.Tensor, row_blocks: int) -> int:
    # A persistent grid of a few programs per SM: enough to fill the GPU, few enough that the
    # [programs, N] dweight partials stay small. Under the interpreter a handful keeps tests fast.
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(row_blocks, 4 * sms))
    return max(1, min(row_blocks, 2))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a copy only when the layout needs it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm (optionally fused with a residual add): forward and backward in Triton.

    forward(x [..., D], residual [..., D] | None, weight [D], eps, out_dtype) -> y, or (y, h) with a
    residual; y in out_dtype, h in the promoted dtype of x and residual.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        shape, n = x.shape, x.shape[-1]
        x2 = _as_rows(x)
        m = x2.shape[0]
        block_m, block_n, num_warps = _launch_config(m, n)
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        has_res = residual is not None
        r2 = _as_rows(residual) if has_res else x2
        h_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
        h = torch.empty((m, n), dtype=h_dtype, device=x.device) if has_res else y
        if m:
            _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
                x2, r2, weight, y, h, rstd,
                x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
                m, n, eps,
                HAS_RESIDUAL=has_res, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(h if has_res else x2, weight, rstd)
        ctx.has_res, ctx.shape = has_res, shape
        ctx.in_dtypes = (x.dtype, residual.dtype if has_res else None)
        ctx.set_materialize_grads(False)
        if has_res:
            return y.view(shape), h.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        x_dtype, r_dtype = ctx.in_dtypes
        if dy is None:  # only h was used downstream: y's branch contributes nothing
            dx = dh.reshape(m, n).view(ctx.shape)
            return dx.to(x_dtype), dx.to(r_dtype), torch.zeros_like(weight), None, None
        dy2 = _as_rows(dy)
        dh2 = _as_rows(dh) if dh is not None else dy2
        # x and residual enter only through h = x + residual: both receive dL/dh, each in its dtype.
        dx = torch.empty((m, n), dtype=x_dtype, device=x2.device)
        two = ctx.has_res and r_dtype != x_dtype
        dr = torch.empty((m, n), dtype=r_dtype, device=x2.device) if two else dx
        block_m, block_n, num_warps = _launch_config(m, n)
        programs = _bwd_programs(x2, triton.cdiv(m, block_m))
        dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        if m:
            _rms_norm_bwd_kernel[(programs,)](
                x2, weight, dy2, dh2, rstd, dx, dr, dw_partial,
                x2.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0), dr.stride(0),
                m, n,
                HAS_DH=dh is not None, HAS_DX2=two, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if m else torch.zeros_like(weight)
        return dx.view(ctx.shape), (dr.view(ctx.shape) if ctx.has_res else None), dw, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"expected x [..., D] and weight [D], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must match x in shape, got {tuple(residual.shape)} and {tuple(x.shape)}")
    for t in (x, weight, residual):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"RMSNorm takes floating-point tensors, got {t.dtype}")


def _check_width(n: int) -> None:
    if n > MAX_WIDTH:
        raise ValueError(
            f"the Triton RMSNorm holds a row in registers (D <= {MAX_WIDTH}), got D={n}: use backend='torch'"
        )


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm. x: [..., D]; weight: [D]. Returns x's shape in out_dtype (default x's)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(out_dtype or x.dtype)


def rms_norm_residual_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch fused residual RMSNorm. x, residual: [..., D]; weight: [D].

    Returns (rms_norm(h) in out_dtype (default h's), h) with h = x + residual (torch's promotion).
    """
    h = x + residual
    return rms_norm_ref(h, weight, eps, out_dtype), h


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the last dim. x: [..., D]; weight: [D]. The result in out_dtype (default x's)."""
    check_backend(backend)
    _check(x, weight)
    if use_triton(backend, x, weight):
        _check_width(x.shape[-1])
        return RMSNormFunction.apply(x, None, weight, eps, out_dtype or x.dtype)
    return rms_norm_ref(x, weight, eps, out_dtype)


def rms_norm_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused h = x + residual; y = rms_norm(h). x, residual: [..., D]; weight: [D]. Returns (y, h).

    h (torch's promoted dtype of x and residual) is the new residual stream for the next block; y is
    in out_dtype (default h's). Gradients flow through both outputs.
    """
    check_backend(backend)
    _check(x, weight, residual)
    if use_triton(backend, x, residual, weight):
        _check_width(x.shape[-1])
        h_dtype = torch.promote_types(x.dtype, residual.dtype)
        return RMSNormFunction.apply(x, residual, weight, eps, out_dtype or h_dtype)
    return rms_norm_residual_ref(x, residual, weight, eps, out_dtype)
