"""The Triton FP8 GEMM (row-wise scales in the epilogue) against the emulated GEMM, and _scaled_mm on GPU."""

import pytest
import torch

from llama3hp.kernels.fp8_gemm import (
    fp8_gemm_rowwise,
    fp8_gemm_rowwise_ref,
    scaled_mm_rowwise,
    scaled_mm_supported,
)
from llama3hp.kernels.fp8_quant import fp8_quantize_rowwise_ref

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _operands(M, N, K, a_dtype=E4M3, b_dtype=E4M3, device=None):  # None: the default device
    x = torch.randn(M, K, device=device) * 3
    w = torch.randn(N, K, device=device) * 0.02
    a, sa = fp8_quantize_rowwise_ref(x, a_dtype)
    b, sb = fp8_quantize_rowwise_ref(w, b_dtype)
    return x, w, a, sa, b, sb


@pytest.mark.parametrize("M,N,K", [(37, 45, 70), (16, 32, 64), (6, 17, 123)])
@pytest.mark.parametrize("a_dtype", [E4M3, E5M2])
def test_triton_gemm_matches_emulated(poison_empty, M, N, K, a_dtype):
    x, w, a, sa, b, sb = _operands(M, N, K, a_dtype)
    out = fp8_gemm_rowwise(a, b, sa, sb, torch.float32, backend="triton")
    ref = fp8_gemm_rowwise_ref(a, b, sa, sb, torch.float32)
    # Same products of exactly representable operands: only the fp32 summation order differs.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # And the FP8 GEMM is an FP8-accurate x @ w^T.
    exact = x.double() @ w.double().t()
    assert ((ref.double() - exact).norm() / exact.norm()).item() < {E4M3: 0.05, E5M2: 0.1}[a_dtype]


def test_triton_gemm_half_output_and_empty():
    _, _, a, sa, b, sb = _operands(20, 24, 40)
    out = fp8_gemm_rowwise(a, b, sa, sb, torch.float16, backend="triton")
    ref = fp8_gemm_rowwise_ref(a, b, sa, sb, torch.float32)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    z = fp8_gemm_rowwise(a[:, :0], b[:, :0], sa, sb, torch.float32, backend="triton")
    assert z.shape == (20, 24) and (z == 0).all()


def test_gemm_bad_inputs():
    _, _, a, sa, b, sb = _operands(8, 16, 32)
    with pytest.raises(ValueError, match="same K"):
        fp8_gemm_rowwise(a, b[:, :16], sa, sb)
    with pytest.raises(ValueError, match="float8"):
        fp8_gemm_rowwise(a.float(), b, sa, sb)
    with pytest.raises(ValueError, match="row-wise scales"):
        fp8_gemm_rowwise(a, b, sa[:4], sb)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm_rowwise(a, b, sa, sb, torch.int32)
    with pytest.raises(RuntimeError, match="compute capability"):
        scaled_mm_rowwise(a, b, sa, sb)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(256, 512, 384), (1000, 1024, 4096)])
def test_scaled_mm_and_triton_on_gpu(M, N, K):
    if not scaled_mm_supported(torch.device("cuda")):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    _, _, a, sa, b, sb = _operands(M, N, K, device="cuda")
    ref = fp8_gemm_rowwise_ref(a, b, sa, sb, torch.float32)
    tol = 1e-2 * ref.abs().max().item()
    for out in (
        scaled_mm_rowwise(a, b, sa, sb, torch.bfloat16),
        fp8_gemm_rowwise(a, b, sa, sb, torch.bfloat16, backend="triton"),
    ):
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=tol)
