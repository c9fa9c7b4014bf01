"""SwiGLU activation: silu(gate) * up, computed in fp32.

Two entry points over the same kernels:
- `swiglu(gate, up)`: gate and up as two tensors [..., F];
- `swiglu_packed(x)`: one tensor [..., 2F] holding [gate | up] per row, what the model's w1/w3
  projections give when they run as one GEMM (`llama3hp.model.llama.grouped_linear`). Its backward
  writes d(gate) and d(up) into one [..., 2F] gradient, which flows into that GEMM's backward as is:
  no split of the forward's output, no concatenation of the gradients.

Triton path: the kernels address rows through a row stride, so the halves of a packed row are read
and written in place. A 2D grid: one program per (row, block of BLOCK_F columns). Backward saves only
the inputs and recomputes sigmoid(gate) instead of storing the activation, which saves one [..., F]
tensor per layer at the price of one exp per element in a memory-bound kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton

# Columns per program: 2,048 over 4 warps = 16 per thread, two 16-byte bf16 vectors per operand.
# F = 14,336 (8B) and 28,672 (70B) are whole multiples, and so are their TP shards down to TP 8.
MAX_BLOCK_F = 2048
NUM_WARPS = 4


@triton.jit
def _sigmoid(x):
    # exp of -|x| never overflows (exp(-x) does for x < -88 in fp32); no libdevice call, so the
    # interpreter runs it too.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, stride_g, stride_u, stride_o, n_cols, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    silu = g * _sigmoid(g)
    tl.store(OUT + row * stride_o + cols, (silu * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    GATE, UP, DOUT, DGATE, DUP, stride_g, stride_u, stride_do, stride_dg, stride_du, n_cols,
    BLOCK_F: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    dg = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGATE + row * stride_dg + cols, dg.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + row * stride_du + cols, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., n] as [rows, n] with unit column stride, a view where the layout allows."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(rows: int, n: int) -> tuple[tuple[int, int], int]:
    block = min(MAX_BLOCK_F, triton.next_power_of_2(n))
    return (rows, triton.cdiv(n, block)), block


def _fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """out [R, F] = silu(gate) * up for row-strided gate, up [R, F]."""
    (rows, n), (grid, block) = gate.shape, _grid(*gate.shape)
    if rows and n:
        _swiglu_fwd_kernel[grid](
            gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n, BLOCK_F=block, num_warps=NUM_WARPS
        )


def _bwd(gate, up, dout, dgate, dup) -> None:
    """dgate, dup [R, F] (row-strided, e.g. the halves of one packed gradient) from gate, up, dout."""
    (rows, n), (grid, block) = gate.shape, _grid(*gate.shape)
    if rows and n:
        _swiglu_bwd_kernel[grid](
            gate, up, dout, dgate, dup,
            gate.stride(0), up.stride(0), dout.stride(0), dgate.stride(0), dup.stride(0), n,
            BLOCK_F=block, num_warps=NUM_WARPS,
        )  # fmt: skip


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up for gate, up: [..., F]; saves only the inputs for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        n = gate.shape[-1]
        g, u = _rows(gate, n), _rows(up, n)
        out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
        _fwd(g, u, out)
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g, u = ctx.saved_tensors
        dgate, dup = torch.empty_like(g), torch.empty_like(u)
        _bwd(g, u, _rows(dout, g.shape[1]), dgate, dup)
        return dgate.view(ctx.shape), dup.view(ctx.shape)


class SwiGLUPackedFunction(torch.autograd.Function):
    """silu(x[..., :F]) * x[..., F:] for x: [..., 2F]; the gradient is one [..., 2F] tensor."""

    @staticmethod
    def forward(ctx, x):
        n = x.shape[-1] // 2
        x2 = _rows(x, 2 * n)
        out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
        _fwd(x2[:, :n], x2[:, n:], out)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dout):
        (x2,) = ctx.saved_tensors
        n = x2.shape[1] // 2
        dx = torch.empty_like(x2)
        _bwd(x2[:, :n], x2[:, n:], _rows(dout, n), dx[:, :n], dx[:, n:])
        return dx.view(ctx.shape)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch SwiGLU. gate, up: [..., F] of one dtype. Returns that shape and dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_packed_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch SwiGLU of packed [gate | up] rows. x: [..., 2F]. Returns [..., F] in x's dtype."""
    return swiglu_ref(*x.chunk(2, dim=-1))


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


def swiglu_packed(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up of packed rows x = [gate | up]: [..., 2F] -> [..., F]."""
    check_backend(backend)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs [..., 2F] rows of [gate | up], got shape {tuple(x.shape)}")
    if use_triton(backend, x):
        return SwiGLUPackedFunction.apply(x)
    return swiglu_packed_ref(x)
