"""FP8 GEMM with row-wise scales applied in the epilogue: out = (a * sa[:, None]) @ (b * sb[:, None])^T.

Operands follow the weight layout of nn.Linear: a [M, K] and b [N, K], both row-major and both
quantized along K (the reduction dim), so every element of a K-slice of a row shares one scale
and the scales factor out of the sum: out[m, n] = sa[m] * sb[n] * sum_k a[m, k] * b[n, k]. The
kernel accumulates the fp8 products in fp32 (tl.dot) and multiplies once per output tile.

Three spellings of the same GEMM:
- `fp8_gemm_rowwise_ref`: dequantize to fp32, fp32 matmul (the emulated path; any device);
- the Triton kernel (`backend="triton"`; on CPU under TRITON_INTERPRET, float8 tl.dot works);
- `scaled_mm_rowwise`: torch._scaled_mm with row-wise scales (CUDA, sm89+), b passed as b.t(),
  i.e. column-major, the layout its row-wise path requires.

Shape legend: M rows of a (tokens), N rows of b (output features), K the reduction dim.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton
from llama3hp.kernels.fp8_quant import FP8_DTYPES

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _fp8_gemm_rowwise_kernel(
    A, B, SA, SB, C, M, N, K,
    stride_am, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped ordering: GROUP_M row-blocks share each column-block of B while it sits in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    # B tile loaded as [BLOCK_K, BLOCK_N] from the row-major [N, K] matrix: K-major, the layout the
    # Hopper fp8 wgmma wants for its second operand.
    b_ptrs = B + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=(rows < M)[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (cols < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(SA + rows, mask=rows < M, other=0.0)
    sb = tl.load(SB + cols, mask=cols < N, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    c_ptrs = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def _gpu_configs() -> list[triton.Config]:
    # 128x128x128 with 8 warps is the usual Hopper fp8 sweet spot; the others cover skinny shapes.
    return [
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3
        ),
        triton.Config(
            {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3
        ),
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4
        ),
    ]


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs one fixed small tile (autotuning would run every config, ~0.5 ms per program).
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
_tuned_kernel = (
    None
    if _INTERPRET
    else triton.autotune(configs=_gpu_configs(), key=["M", "N", "K"])(_fp8_gemm_rowwise_kernel)
)


def _check_operands(a, b, scale_a, scale_b, out_dtype) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"fp8 GEMM expects a [M, K] and b [N, K] with the same K, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        raise ValueError(
            f"fp8 GEMM operands must be float8 tensors, got {a.dtype} and {b.dtype}: quantize first"
        )
    if scale_a.shape != (a.shape[0],) or scale_b.shape != (b.shape[0],):
        raise ValueError(
            f"row-wise scales must be [M]={a.shape[0]} and [N]={b.shape[0]}, "
            f"got {tuple(scale_a.shape)} and {tuple(scale_b.shape)}"
        )
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"fp8 GEMM out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def fp8_gemm_rowwise_ref(a, b, scale_a, scale_b, out_dtype=torch.float32):
    """Emulated FP8 GEMM: a [M, K], b [N, K] fp8; scale_a [M], scale_b [N] fp32 (dequant scales).
    Returns [M, N] in out_dtype, computed as an fp32 matmul of the dequantized operands."""
    _check_operands(a, b, scale_a, scale_b, out_dtype)
    a32 = a.float() * scale_a.float()[:, None]
    b32 = b.float() * scale_b.float()[:, None]
    return (a32 @ b32.t()).to(out_dtype)


def _fp8_gemm_triton(a, b, scale_a, scale_b, out_dtype):
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    sa, sb = scale_a.float().contiguous(), scale_b.float().contiguous()
    if _tuned_kernel is None:
        meta = _INTERPRET_META
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _fp8_gemm_rowwise_kernel[grid](
            a, b, sa, sb, c, M, N, K, a.stride(0), b.stride(0), c.stride(0), **meta
        )
    else:

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _tuned_kernel[grid](a, b, sa, sb, c, M, N, K, a.stride(0), b.stride(0), c.stride(0))
    return c


def scaled_mm_supported(device: torch.device) -> bool:
    """torch._scaled_mm runs FP8 on CUDA devices of compute capability 8.9 (Ada) and newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_rowwise(a, b, scale_a, scale_b, out_dtype=torch.bfloat16):
    """torch._scaled_mm with row-wise scales: a [M, K], b [N, K] fp8 (row-major), scales [M], [N].

    _scaled_mm wants mat2 column-major ([K, N] with stride (1, K)), which b.t() is for free, and
    scales shaped [M, 1] and [1, N]. Its CUTLASS row-wise path writes only bf16 (fp32 output needs
    cuBLAS >= 12.9 on sm90), so other dtypes are produced as bf16 and cast.
    """
    _check_operands(a, b, scale_a, scale_b, out_dtype)
    if not scaled_mm_supported(a.device):
        raise RuntimeError(
            f"torch._scaled_mm needs a CUDA device with compute capability >= 8.9, got {a.device}: "
            "use the emulated GEMM (gemm='torch')"
        )
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    mm_dtype = out_dtype if out_dtype == torch.bfloat16 else torch.bfloat16
    out = torch._scaled_mm(
        a,
        b.t(),
        scale_a=scale_a.float().reshape(-1, 1).contiguous(),
        scale_b=scale_b.float().reshape(1, -1).contiguous(),
        out_dtype=mm_dtype,
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


def fp8_gemm_rowwise(a, b, scale_a, scale_b, out_dtype=torch.bfloat16, *, backend: str = "auto"):
    """(a * scale_a[:, None]) @ (b * scale_b[:, None])^T with fp32 accumulation.

    a [M, K], b [N, K]: fp8 (E4M3 or E5M2), quantized along K; scale_a [M], scale_b [N]: fp32
    dequantization scales. Returns [M, N] in out_dtype. backend "triton" runs the Triton kernel,
    "torch" the fp32 emulation, "auto" Triton on CUDA.
    """
    check_backend(backend)
    _check_operands(a, b, scale_a, scale_b, out_dtype)
    if use_triton(backend, a, b, scale_a, scale_b):
        return _fp8_gemm_triton(a, b, scale_a, scale_b, out_dtype)
    return fp8_gemm_rowwise_ref(a, b, scale_a, scale_b, out_dtype)
