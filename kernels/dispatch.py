"""Picks the implementation of a fused op: Triton on CUDA tensors, the PyTorch reference elsewhere.

`backend` is one of:
- "auto": Triton when every tensor is on CUDA and Triton imports, else the reference;
- "triton": always Triton (on CPU this needs TRITON_INTERPRET=1: that is how tests run kernels);
- "torch": always the plain-PyTorch reference (the baseline a config flag can switch to).
"""

from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def use_triton(backend: str, *tensors: torch.Tensor | None) -> bool:
    """Whether an op called with `backend` on `tensors` should launch its Triton kernel."""
    check_backend(backend)
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed: pip install triton")
        return True
    return triton_available() and all(t.is_cuda for t in tensors if t is not None)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when autocast is on for x's device, else x's.

    Custom autograd Functions that run their own GEMMs cast to this at entry and then run with
    autocast off: on CUDA the backward runs on autograd's device thread, where autocast is always
    off, so a Function relying on the ambient autocast would run its backward GEMMs in fp32.
    """
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def autocast_off(fn):
    """Decorates a custom autograd Function's forward or backward to run with autocast disabled on the
    device of its first tensor argument (see matmul_dtype: such Functions handle dtypes explicitly)."""

    @functools.wraps(fn)
    def run(ctx, *args):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None:
            return fn(ctx, *args)
        with torch.autocast(device_type=t.device.type, enabled=False):
            return fn(ctx, *args)

    return run
