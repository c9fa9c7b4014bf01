"""Linear cross-entropy: the loss of `hidden @ weight.T` against targets.

The reference materialises the logits (in fp32); the fused kernel computes the same loss and the
gradients of hidden and weight chunk by chunk without ever holding [N, V] logits.
Conventions shared by every implementation:
- targets equal to `ignore_index` contribute nothing (not to the loss, not to the count);
- reduction "mean" divides by the number of non-ignored targets (0 if there are none),
  "sum" adds, "none" returns one loss per row (0 on ignored rows);
- z-loss (PaLM): `z_loss_scale * logsumexp(logits)^2` is added per non-ignored row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3hp.kernels.dispatch import check_backend

REDUCTIONS = ("mean", "sum", "none")


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
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
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` (see module docstring). hidden: [N, D]; weight: [V, D]."""
    check_backend(backend)
    return linear_cross_entropy_ref(
        hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, z_loss_scale=z_loss_scale
    )
