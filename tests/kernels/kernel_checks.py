"""Shared tolerance rule for kernel tests (DESIGN.md "Numbers"): a kernel's error against a float64
reference is at most twice PyTorch's own error doing the same math in the same dtype, plus a small
atol of about one unit in the last place of the output's magnitude."""

import torch

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close_to_ref(
    out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, *, name: str, atol_ulps: float = 2.0
) -> None:
    """out: the kernel's result; ref64: the float64 reference; torch_out: the reference run in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed elements)"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    torch_err = (torch_out.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    atol = atol_ulps * EPS[out.dtype] * max(scale, 1e-3)
    assert err <= 2 * torch_err + atol, (
        f"{name}: error {err:.3g} > 2 x torch {torch_err:.3g} + atol {atol:.3g}"
    )
