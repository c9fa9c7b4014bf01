"""SwiGLU activation: silu(gate) * up, computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3hp.kernels.dispatch import check_backend


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch SwiGLU. gate, up: [..., F] of one dtype. Returns that shape and dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up. gate, up: [..., F]."""
    check_backend(backend)
    return swiglu_ref(gate, up)
