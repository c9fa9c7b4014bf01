"""The CUDA cast+transpose (csrc/fp8/cast_transpose.cu) as the custom op llama3hp::fp8_cast_transpose.

The op is registered with torch.library.custom_op and a fake (shape-only) implementation, so it
survives torch.compile and meta/fake tensors whether or not the extension `llama3hp._fp8_cuda` was
built (setup.py builds it only where nvcc and a CUDA torch are present); calling it for real
without the extension raises a one-line RuntimeError.
"""

from __future__ import annotations

import torch

from llama3hp.kernels.fp8_quant import check_quant_input

try:
    from llama3hp import _fp8_cuda  # type: ignore[attr-defined]
except ImportError:
    _fp8_cuda = None

_OUT_CODES = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
_CODE_DTYPES = {v: k for k, v in _OUT_CODES.items()}


def cuda_ext_available() -> bool:
    return _fp8_cuda is not None


@torch.library.custom_op("llama3hp::fp8_cast_transpose", mutates_args=(), device_types="cuda")
def fp8_cast_transpose_op(
    x: torch.Tensor, out_code: int, scale_ub: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] CUDA -> (q [M, K], scale_inv [M], qt [K, M], scale_inv_t [K]); scale_ub <= 0: none."""
    if _fp8_cuda is None:
        raise RuntimeError(
            "llama3hp._fp8_cuda is not built: reinstall on a machine with nvcc and a CUDA torch "
            "(pip install -e . --no-build-isolation), or use quant_backend='triton'"
        )
    q, s, qt, st = _fp8_cuda.fp8_cast_transpose(x, out_code, scale_ub)
    return q, s, qt, st


@fp8_cast_transpose_op.register_fake
def _(x, out_code, scale_ub):
    M, K = x.shape
    fp8 = _CODE_DTYPES[out_code]
    return (
        x.new_empty((M, K), dtype=fp8),
        x.new_empty((M,), dtype=torch.float32),
        x.new_empty((K, M), dtype=fp8),
        x.new_empty((K,), dtype=torch.float32),
    )


def cuda_cast_transpose(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, scale_ub=None):
    """Same contract as llama3hp.kernels.fp8_quant.fp8_cast_transpose (no finiteness check)."""
    check_quant_input(x, fp8_dtype, scale_ub)
    if not x.is_cuda:
        raise ValueError(
            f"the CUDA cast+transpose needs a CUDA tensor, got {x.device}: use quant_backend='triton'"
        )
    if x.numel() == 0:
        M, K = x.shape
        ones = x.new_ones
        return (
            x.new_empty((M, K), dtype=fp8_dtype),
            ones((M,), dtype=torch.float32),
            x.new_empty((K, M), dtype=fp8_dtype),
            ones((K,), dtype=torch.float32),
        )
    x = x if x.stride(1) == 1 else x.contiguous()
    return fp8_cast_transpose_op(x, _OUT_CODES[fp8_dtype], float(scale_ub) if scale_ub is not None else 0.0)
