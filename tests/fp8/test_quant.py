"""FP8 row-wise quantization: error bounds of the recipe, saturation and scale bounds, the inf/NaN
policy, and the Triton kernels (interpreter on CPU) against the emulated reference."""

import pytest
import torch

from llama3hp.kernels.fp8_quant import (
    dequantize_rowwise,
    fp8_cast_transpose,
    fp8_cast_transpose_ref,
    fp8_max,
    fp8_quantize_rowwise,
    fp8_quantize_rowwise_ref,
    fp8_scale_ref,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA = {E4M3: 3, E5M2: 2}
SUBNORMAL_STEP = {E4M3: 2.0**-9, E5M2: 2.0**-16}


def _max_abs_err_bound(x: torch.Tensor, scale_inv: torch.Tensor, dtype) -> torch.Tensor:
    """Round-to-nearest error of one element: half an fp8 ulp, relative in the normal range and
    absolute (half the subnormal spacing, in x's units) below it."""
    rel = 2.0 ** -(MANTISSA[dtype] + 1)
    return rel * x.abs() + 0.5 * SUBNORMAL_STEP[dtype] * scale_inv[:, None] + 1e-12


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_rowwise_error_within_half_ulp(dtype):
    x = torch.randn(64, 96) * torch.logspace(-3, 3, 64)[:, None]  # rows over six decades
    q, s = fp8_quantize_rowwise_ref(x, dtype)
    dq = dequantize_rowwise(q, s)
    assert (dq - x).abs().le(_max_abs_err_bound(x, s, dtype)).all()
    # The row amax maps to fp8_max exactly (up to the scale's own rounding): no range is wasted.
    torch.testing.assert_close(q.float().abs().amax(1), torch.full((64,), fp8_max(dtype)), rtol=0.07, atol=0)
    rel_rmse = ((dq - x).norm() / x.norm()).item()
    assert rel_rmse < {E4M3: 0.04, E5M2: 0.08}[dtype]


def test_scale_formula_and_upper_bound():
    amax = torch.tensor([0.0, 1e-30, 1.0, 448.0, 1200.0, 5000.0, float("inf"), float("nan")])
    scale, scale_inv = fp8_scale_ref(amax, E4M3, scale_ub=1200.0)
    assert scale[0] == 1.0  # all-zero row
    assert scale[1] == 448.0 / 1e-12  # the eps floor keeps the scale finite
    assert scale[2] == 448.0 and scale[3] == 1.0
    assert scale[4] == scale[5] == pytest.approx(448.0 / 1200.0)  # amax clamped at the bound
    assert torch.isnan(scale[6:]).all() and torch.isnan(scale_inv[6:]).all()
    assert torch.isfinite(scale[:6]).all()


def test_activation_bound_saturates_outliers():
    x = torch.randn(4, 32)
    x[1, 5] = 1e6
    q, s = fp8_quantize_rowwise_ref(x, E4M3, scale_ub=1200.0)
    dq = dequantize_rowwise(q, s)
    assert s[1].item() == pytest.approx(1200.0 / 448.0)
    assert dq[1, 5].item() == pytest.approx(1200.0)  # saturated at the bound, not at the outlier
    q2, s2 = fp8_quantize_rowwise_ref(x, E4M3, scale_ub=None)
    assert dequantize_rowwise(q2, s2)[1, 5].item() == pytest.approx(1e6, rel=0.07)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_huge_tiny_and_zero_rows_never_overflow(backend, dtype):
    x = torch.randn(6, 40)
    x[0] = 0.0
    x[1, 3] = 3e38  # near fp32 max
    x[2] *= 1e-30  # fp32 normal, far below fp8's range
    x[3, :] = -2e-45  # fp32 denormals
    q, s, qt, st = fp8_cast_transpose(x, dtype, backend=backend)
    for qq, ss in ((q, s), (qt, st)):
        assert torch.isfinite(qq.float()).all() and qq.float().abs().max() <= fp8_max(dtype)
        assert torch.isfinite(ss).all() and (ss > 0).all()
    assert (q[0].float() == 0).all() and s[0] == 1.0
    dq = dequantize_rowwise(q, s)
    assert dq[1, 3].item() == pytest.approx(3e38, rel=0.07)
    assert ((dq[2] - x[2]).abs() <= _max_abs_err_bound(x[2:3], s[2:3], dtype)[0]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_input_raises_or_poisons_the_row(backend):
    x = torch.randn(5, 24)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="inf/NaN in 2 row"):
        fp8_quantize_rowwise(x, backend=backend)
    with pytest.raises(ValueError, match="inf/NaN"):
        fp8_cast_transpose(x, backend=backend)
    # Unchecked: exactly the non-finite rows (and columns) get a NaN dequant scale.
    q, s, qt, st = fp8_cast_transpose(x, check_finite=False, backend=backend)
    assert torch.isnan(s).tolist() == [False, True, False, True, False]
    assert torch.isnan(st).nonzero().flatten().tolist() == [0, 2]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        fp8_quantize_rowwise(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        fp8_quantize_rowwise(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="unsupported fp8 dtype"):
        fp8_quantize_rowwise(torch.randn(2, 3), torch.float16)
    with pytest.raises(ValueError, match="scale_ub"):
        fp8_cast_transpose(torch.randn(2, 3), scale_ub=-1.0)


def _assert_quant_match(q, s, q_ref, s_ref, dtype):
    """Same quantization up to the interpreter's last-bit caveat: scales to fp32 rounding, dequantized
    values to one fp8 ulp (asserting the error, not the bits)."""
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    dq, dq_ref = dequantize_rowwise(q, s), dequantize_rowwise(q_ref, s_ref)
    assert torch.isfinite(dq).all()
    tol = 2.0 ** -MANTISSA[dtype] * dq_ref.abs() + SUBNORMAL_STEP[dtype] * s_ref[:, None]
    assert (dq - dq_ref).abs().le(tol).all()
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 0.01  # almost always bit-equal


@pytest.mark.parametrize("shape", [(37, 53), (6, 123), (42, 16)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale_ub", [None, 1200.0])
def test_triton_matches_emulated(poison_empty, shape, dtype, in_dtype, scale_ub):
    x = (torch.randn(shape) * 4).to(in_dtype)
    x[0, 0] = 3000.0  # beyond the activation bound
    if shape[0] > 3:
        x[3] = 0.0
    q, s = fp8_quantize_rowwise(x, dtype, scale_ub, backend="triton")
    q_ref, s_ref = fp8_quantize_rowwise_ref(x, dtype, scale_ub)
    _assert_quant_match(q, s, q_ref, s_ref, dtype)
    out = fp8_cast_transpose(x, dtype, scale_ub, backend="triton")
    ref = fp8_cast_transpose_ref(x, dtype, scale_ub)
    _assert_quant_match(out[0], out[1], ref[0], ref[1], dtype)
    _assert_quant_match(out[2], out[3], ref[2], ref[3], dtype)


def test_cast_transpose_ref_layout():
    x = torch.randn(7, 11)
    q, s, qt, st = fp8_cast_transpose_ref(x, E4M3)
    assert qt.shape == (11, 7) and qt.is_contiguous() and st.shape == (11,)
    q2, s2 = fp8_quantize_rowwise_ref(x.t().contiguous(), E4M3)
    assert torch.equal(qt.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(st, s2)


def test_empty_inputs():
    for backend in ("torch", "triton"):
        q, s, qt, st = fp8_cast_transpose(torch.randn(0, 8), backend=backend)
        assert q.shape == (0, 8) and qt.shape == (8, 0) and st.shape == (8,) and (st == 1).all()
