"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

Math convention (shared by every implementation): upcast x to fp32, normalise, multiply by the
fp32 weight, cast once to x's dtype.
"""

from __future__ import annotations

import torch

from llama3hp.kernels.dispatch import check_backend


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain-PyTorch RMSNorm. x: [..., D]; weight: [D]. Returns x's shape and dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim. x: [..., D]; weight: [D]."""
    check_backend(backend)
    return rms_norm_ref(x, weight, eps)
