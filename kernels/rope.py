"""Rotary position embedding (RoPE) applied to q and k with per-token positions.

Layout: the "half-split" rotation (pairs (x[i], x[i + D/2])), which keeps each half contiguous
for the kernel. Meta's checkpoints use interleaved pairs; the converters in
`llama3hp.model.convert` permute wq/wk rows so both layouts give the same model.
Angles are computed in fp32 as position * inv_freq, so positions may restart inside a packed row
(one document each) and inv_freq may carry the Llama 3.1 frequency scaling.
"""

from __future__ import annotations

import torch

from llama3hp.kernels.dispatch import check_backend


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


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [B, T, Hq, D] and k [B, T, Hk, D] by positions [B, T] (see module docstring)."""
    if q.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dim, got {q.shape[-1]}")
    check_backend(backend)
    return apply_rope_ref(q, k, positions, inv_freq)
