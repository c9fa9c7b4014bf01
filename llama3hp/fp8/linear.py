"""Fp8Linear: an nn.Linear whose three GEMMs run on FP8 operands with row-wise dynamic scales.

For y = x W^T (x [M, K] tokens, W [N, K]) each GEMM quantizes its operands along its own
reduction dim, which is what makes row-wise scales factor out of the sum:

    forward  y  = x  @ W^T   reduce over K: x per token (row of x), W per output channel (row of W)
    backward dx = dy @ W     reduce over N: dy per token, W per input channel (row of W^T)
    backward dW = dy^T @ x   reduce over M: dy per output channel (row of dy^T), x per input channel

Each of x, W and dy is therefore needed quantized along both of its dims: one cast+transpose
pass gives both. The forward saves the transposed fp8 copies of x and W (1 byte per element,
half of saving x in bf16) instead of the high-precision tensors. The weights stay in their master
dtype; only GEMM operands are FP8. The activation amax is clamped at `activation_scale_ub`.

Shape legend: M tokens (all leading dims of x flattened), K in_features, N out_features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llama3hp.fp8.config import Fp8Config
from llama3hp.kernels.fp8_gemm import (
    fp8_gemm_rowwise,
    fp8_gemm_rowwise_ref,
    scaled_mm_rowwise,
    scaled_mm_supported,
)
from llama3hp.kernels.fp8_quant import (
    check_finite_scales,
    fp8_cast_transpose,
    fp8_cast_transpose_ref,
    fp8_quantize_rowwise,
    fp8_quantize_rowwise_ref,
)


def quantize_cast_transpose(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None, cfg: Fp8Config):
    """x [R, C] -> (q [R, C], scale_inv [R], qt [C, R], scale_inv_t [C]) by the configured backend."""
    backend = cfg.quant_impl
    if backend == "cuda":
        from llama3hp.fp8.cuda_ops import cuda_cast_transpose

        out = cuda_cast_transpose(x, fp8_dtype, scale_ub)
    elif backend == "torch":
        out = fp8_cast_transpose_ref(x, fp8_dtype, scale_ub)
    else:
        out = fp8_cast_transpose(x, fp8_dtype, scale_ub, check_finite=False, backend=backend)
    if cfg.check_finite:
        check_finite_scales(out[1], out[3])
    return out


def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None, cfg: Fp8Config):
    """x [R, C] -> (q [R, C], scale_inv [R]) quantized per row by the configured backend.

    Same values as the first half of `quantize_cast_transpose` (the CUDA backend has only the
    cast+transpose kernel, so it runs that and keeps the row-wise half)."""
    backend = cfg.quant_impl
    if backend == "cuda":
        q, s = quantize_cast_transpose(x, fp8_dtype, scale_ub, cfg)[:2]
        return q, s
    if backend == "torch":
        q, s = fp8_quantize_rowwise_ref(x, fp8_dtype, scale_ub)
    else:
        q, s = fp8_quantize_rowwise(x.contiguous(), fp8_dtype, scale_ub, check_finite=False, backend=backend)
    if cfg.check_finite:
        check_finite_scales(s)
    return q, s


def gemm_rowwise(a, b, scale_a, scale_b, out_dtype: torch.dtype, cfg: Fp8Config) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b)^T for a [M, R], b [N, R] fp8 by the configured GEMM -> [M, N]."""
    gemm = cfg.gemm_impl
    if gemm == "auto":
        gemm = "scaled_mm" if scaled_mm_supported(a.device) else ("triton" if a.is_cuda else "torch")
    if gemm == "scaled_mm":
        return scaled_mm_rowwise(a, b, scale_a, scale_b, out_dtype)
    if gemm == "triton":
        return fp8_gemm_rowwise(a, b, scale_a, scale_b, out_dtype, backend="triton")
    return fp8_gemm_rowwise_ref(a, b, scale_a, scale_b, out_dtype)


@dataclass(frozen=True)
class Fp8Gemms:
    """The three GEMMs of y = x W^T on FP8 operands, for code that schedules its own GEMMs (the
    tensor-parallel overlap in `llama3hp.parallel.tensor` runs them chunk by chunk of tokens).

    Each GEMM quantizes both operands per row along its reduction dim, with the formats and the
    activation bound of `Fp8LinearFunction`, so a GEMM cut into row chunks of x or dy gives exactly
    the rows of the whole one (per-token scales are row-local). 2-D operands; results in out_dtype.
    """

    cfg: Fp8Config

    @staticmethod
    def weight_operand(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The master weight itself: each GEMM quantizes it from full precision."""
        return w

    def _mm(self, a, a_dtype, a_ub, b, b_dtype, b_ub, out_dtype) -> torch.Tensor:
        with torch.autocast(device_type=a.device.type, enabled=False):
            aq, sa = quantize_rows(a, a_dtype, a_ub, self.cfg)
            bq, sb = quantize_rows(b, b_dtype, b_ub, self.cfg)
            return gemm_rowwise(aq, bq, sa, sb, out_dtype, self.cfg)

    def fprop(self, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] @ w [N, K]^T -> [M, N]: x per token (bounded), w per output channel."""
        c = self.cfg
        return self._mm(x, c.fwd_torch_dtype, c.activation_scale_ub, w, c.fwd_torch_dtype, None, out_dtype)

    def dgrad(self, dy: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """dy [M, N] @ w [N, K] -> dx [M, K]: dy per token, w per input channel."""
        c = self.cfg
        return self._mm(dy, c.grad_torch_dtype, None, w.t(), c.fwd_torch_dtype, None, out_dtype)

    def wgrad(self, dy: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """dy [M, N]^T @ x [M, K] -> dW [N, K]: both per channel along the tokens."""
        c = self.cfg
        return self._mm(
            dy.t(), c.grad_torch_dtype, None, x.t(), c.fwd_torch_dtype, c.activation_scale_ub, out_dtype
        )


class Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with FP8 GEMMs in forward and backward; x [..., K], W [N, K] -> y [..., N]."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: Fp8Config, out_dtype: torch.dtype):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        fwd = cfg.fwd_torch_dtype
        xq, sx, xtq, sxt = quantize_cast_transpose(x2, fwd, cfg.activation_scale_ub, cfg)
        wq, sw, wtq, swt = quantize_cast_transpose(weight, fwd, None, cfg)
        y = gemm_rowwise(xq, wq, sx, sw, out_dtype, cfg)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(xtq, sxt, wtq, swt)
        ctx.cfg, ctx.x_shape, ctx.x_dtype, ctx.has_bias = cfg, x.shape, x.dtype, bias is not None
        ctx.w_dtype = weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        # Backward on CPU runs in the caller's thread, possibly still inside its autocast region.
        with torch.autocast(device_type=dy.device.type, enabled=False):
            return Fp8LinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        xtq, sxt, wtq, swt = ctx.saved_tensors
        cfg = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dy2 = dy2.float()
        dyq, sdy, dytq, sdyt = quantize_cast_transpose(dy2, cfg.grad_torch_dtype, None, cfg)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx [M, K] = dy [M, N] @ W [N, K]: W^T [K, N] quantized along N is the "b" operand.
            dx = gemm_rowwise(dyq, wtq, sdy, swt, ctx.x_dtype, cfg).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # dW [N, K] = dy^T [N, M] @ x [M, K]: both quantized along M (the token dim).
            dw = gemm_rowwise(dytq, xtq, sdyt, sxt, ctx.w_dtype, cfg)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0)
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Fp8Config
) -> torch.Tensor:
    """y = x W^T (+ b) with the FP8 GEMMs of `cfg`; x [..., K], W [N, K] -> [..., N] in the autocast
    dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if x.dtype != out_dtype and out_dtype in (torch.float16, torch.bfloat16):
        x = x.to(out_dtype)
    # The quantized GEMMs pick their own precision; autocast must not recast their fp32 parts.
    with torch.autocast(device_type=dev, enabled=False):
        return Fp8LinearFunction.apply(x, weight, bias, cfg, out_dtype)


class Fp8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs (see the module docstring). Same parameters and state-dict keys."""

    fp8_config: Fp8Config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config) -> Fp8Linear:
        """Wraps the Parameters of `linear` (shared, not copied), so optimizers and checkpoints see no change."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.fp8_config = config.validate()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in the autocast dtype when autocast is on, else x's dtype."""
        return fp8_linear(x, self.weight, self.bias, self.fp8_config)

    def extra_repr(self) -> str:
        c = self.fp8_config
        return f"{super().extra_repr()}, recipe={c.recipe}, fwd={c.fwd_dtype}, grad={c.grad_dtype}"
