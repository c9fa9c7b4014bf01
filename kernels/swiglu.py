"""SwiGLU activation: silu(gate) * up, computed in fp32.

Triton path: a flat elementwise kernel over the (contiguous) [..., F] tensors. Backward saves only
gate and up and recomputes sigmoid(gate) instead of storing the activation, which saves one
[..., F] tensor per layer at the price of one exp per element in a memory-bound kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton

# 4,096 elements over 8 warps = 16 per thread: two 16-byte bf16 vectors per operand.
BLOCK_SIZE = 4096
NUM_WARPS = 8


@triton.jit
def _sigmoid(x):
    # exp of -|x| never overflows (exp(-x) does for x < -88 in fp32); no libdevice call, so the
    # interpreter runs it too.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    silu = g * _sigmoid(g)
    tl.store(OUT + offs, (silu * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(GATE, UP, DOUT, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DGATE + offs, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up for gate, up: [..., F]; saves only the inputs for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
                gate, up, out, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS
            )
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
                gate, up, dout, dgate, dup, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS
            )
        return dgate, dup


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch SwiGLU. gate, up: [..., F] of one dtype. Returns that shape and dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up. gate, up: [..., F]."""
    check_backend(backend)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gate and up must match in shape and dtype, got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    if use_triton(backend, gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_ref(gate, up)
