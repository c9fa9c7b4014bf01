"""Rotary position embedding (RoPE) applied to q and k with per-token positions.

Layout: the "half-split" rotation (pairs (x[i], x[i + D/2])), which keeps each half contiguous
for the kernel. Meta's checkpoints use interleaved pairs; the converters in
`llama3hp.model.convert` permute wq/wk rows so both layouts give the same model.
Angles are computed in fp32 as position * inv_freq, so positions may restart inside a packed row
(one document each) and inv_freq may carry the Llama 3.1 frequency scaling.

Triton path: one launch rotates q and k together, one program per block of 16 tokens: it
computes those tokens' cos/sin once ([16, D/2] fp32) and applies them to all Hq query heads and
Hk key heads, so the angles are never materialised in memory. Backward is the same kernel rotating by -angle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton


@triton.jit
def _rotate_heads(
    X, XO, b, t, tok_mask, stride_b, stride_t, stride_h, stride_ob, stride_ot, stride_oh,
    n_heads, half, cos, sin, d, d_mask,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    # Tiles are [BLOCK_T, BLOCK_H, BLOCK_HALF]: tokens x heads x half the head dim.
    tok3 = tok_mask[:, None, None] & d_mask[None, None, :]
    src = X + (b * stride_b + t * stride_t)[:, None, None] + d[None, None, :]
    dst = XO + (b * stride_ob + t * stride_ot)[:, None, None] + d[None, None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = tok3 & (heads < n_heads)[None, :, None]
        # Both halves are loaded before anything is stored: in-place rotation is safe.
        x1 = tl.load(src + heads[None, :, None] * stride_h, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + heads[None, :, None] * stride_h + half, mask=mask, other=0.0).to(tl.float32)
        out = dst + heads[None, :, None] * stride_oh
        tl.store(out, (x1 * cos - x2 * sin).to(XO.dtype.element_ty), mask=mask)
        tl.store(out + half, (x2 * cos + x1 * sin).to(XO.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO,  # [B, T, Hq, D], [B, T, Hk, D] inputs and outputs (may alias)
    POS,  # [B, T] integer positions
    INV_FREQ,  # [D/2] fp32
    n_tokens, T, n_q_heads, n_k_heads, half, sign,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh,
    stride_kob, stride_kot, stride_koh,
    stride_pb, stride_pt,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    b = tok // T
    t = tok % T
    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tok_mask, other=0).to(tl.float32)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    # cos/sin once per token, shared by all Hq + Hk heads: the transcendental work is 1/(Hq+Hk)
    # of the elements rotated, so the kernel stays memory-bound.
    angle = pos[:, None] * tl.load(INV_FREQ + d, mask=d_mask, other=0.0)[None, :]
    cos = tl.cos(angle)[:, None, :]
    sin = (tl.sin(angle) * sign)[:, None, :]  # sign -1 rotates back (the backward pass)
    _rotate_heads(
        Q, QO, b, t, tok_mask, stride_qb, stride_qt, stride_qh, stride_qob, stride_qot, stride_qoh,
        n_q_heads, half, cos, sin, d, d_mask, BLOCK_H,
    )  # fmt: skip
    _rotate_heads(
        K, KO, b, t, tok_mask, stride_kb, stride_kt, stride_kh, stride_kob, stride_kot, stride_koh,
        n_k_heads, half, cos, sin, d, d_mask, BLOCK_H,
    )  # fmt: skip


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernel walks B, T and heads by stride (views from a fused QKV projection work as they
    # are) but needs each head's D contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_rope(q, k, qo, ko, positions, inv_freq, sign: float) -> None:
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    if B * T == 0:
        return
    # 16 tokens per program (1,024 programs for a 16K-token batch) and as many heads per tile as
    # keep it near 4,096 elements: [16, 4, 64] at D=128 (128-byte rows in bf16).
    block_t = min(triton.next_power_of_2(B * T), 16)
    block_half = triton.next_power_of_2(D // 2)
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hk)), 4096 // (block_t * block_half)))
    _rope_kernel[(triton.cdiv(B * T, block_t),)](
        q, k, qo, ko, positions, inv_freq,
        B * T, T, Hq, Hk, D // 2, sign,
        *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
        *positions.stride(),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )  # fmt: skip


class RoPEFunction(torch.autograd.Function):
    """Rotates q [B, T, Hq, D] and k [B, T, Hk, D] by positions [B, T] * inv_freq [D/2] in one launch.

    forward(q, k, positions, inv_freq, inplace) -> (q_rot, k_rot); with inplace the results are
    written into q and k (marked dirty, so autograd tracks the mutation).
    """

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, inplace):
        if inplace:
            qo, ko = q, k
        else:
            q, k = _unit_last_stride(q), _unit_last_stride(k)
            qo, ko = (
                torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
            )
        _launch_rope(q, k, qo, ko, positions, inv_freq, 1.0)
        ctx.save_for_backward(positions, inv_freq)
        if inplace:
            ctx.mark_dirty(q, k)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _unit_last_stride(dq), _unit_last_stride(dk)
        # The rotation is orthogonal: its vector-Jacobian product is the rotation by -angle.
        dqo = torch.empty_like(dq, memory_format=torch.contiguous_format)
        dko = torch.empty_like(dk, memory_format=torch.contiguous_format)
        _launch_rope(dq, dk, dqo, dko, positions, inv_freq, -1.0)
        return dqo, dko, None, None, None


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch RoPE.

    q: [B, T, Hq, D]; k: [B, T, Hk, D]; positions: [B, T] integer; inv_freq: [D/2] fp32.
    Returns rotated (q, k) with the input dtypes.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [B, T, D/2]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"expected q [B, T, Hq, D] and k [B, T, Hk, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dim, got {q.shape[-1]}")
    if positions.shape != q.shape[:2] or positions.is_floating_point():
        raise ValueError(
            f"expected integer positions [B, T] = {list(q.shape[:2])}, got {positions.dtype} {tuple(positions.shape)}"
        )
    if inv_freq.shape != (q.shape[-1] // 2,):
        raise ValueError(f"expected inv_freq [D/2] = [{q.shape[-1] // 2}], got {tuple(inv_freq.shape)}")


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    inplace: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [B, T, Hq, D] and k [B, T, Hk, D] by positions [B, T] (see module docstring).

    inplace: write the rotated values into q and k (and return them); autograd-safe for tensors
    that are not views. Autograd cannot track a two-output Function that mutates views (such as
    q/k sliced from a projection's output), so that case is refused; the model rotates out of place.
    """
    check_backend(backend)
    _check(q, k, positions, inv_freq)
    if (
        inplace
        and torch.is_grad_enabled()
        and (q._is_view() or k._is_view())
        and (q.requires_grad or k.requires_grad)
    ):
        raise ValueError(
            "in-place RoPE cannot rotate views that require grad (an autograd limit): pass inplace=False"
        )
    if use_triton(backend, q, k, positions, inv_freq):
        if inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
            raise ValueError(
                "in-place RoPE needs q and k with a contiguous head dim (stride(-1) == 1): pass inplace=False"
            )
        return RoPEFunction.apply(q, k, positions, inv_freq.to(torch.float32).contiguous(), inplace)
    q_rot, k_rot = apply_rope_ref(q, k, positions, inv_freq)
    if inplace:
        return q.copy_(q_rot), k.copy_(k_rot)
    return q_rot, k_rot
