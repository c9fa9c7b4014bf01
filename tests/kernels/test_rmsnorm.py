"""RMSNorm and fused residual RMSNorm: Triton (interpreter on CPU) against a float64 reference."""

import pytest
import torch
from kernel_checks import assert_close_to_ref

from llama3hp.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_residual, rms_norm_residual_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Rows not a multiple of anything; widths not powers of two, up to the 16,384 of the 405B model.
SHAPES = [(6, 64), (42, 300), (123, 1000), (2, 21, 136)]


def _rms_norm64(x, w, eps=1e-5):
    # The float64 reference: rms_norm_ref itself computes in fp32 by convention.
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _rms_norm_residual64(x, r, w, eps=1e-5):
    h = x.double() + r.double()
    return _rms_norm64(h, w, eps), h


def _grads(fn, inputs, grads_out):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads_out))
    return outs, torch.autograd.grad(total, inputs)


def _leaf(t, dtype):
    return t.to(dtype).requires_grad_()


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_float64_reference(shape, dtype):
    x = torch.randn(shape) * 2 + 0.5
    w = torch.rand(shape[-1]) + 0.5
    dy = torch.randn(shape)
    (y,), (dx, dw) = _grads(
        lambda a, b: rms_norm(a, b, backend="triton"), [_leaf(x, dtype), _leaf(w, dtype)], [dy]
    )
    (y64,), (dx64, dw64) = _grads(
        _rms_norm64, [_leaf(x, torch.float64), _leaf(w, torch.float64)], [dy.double()]
    )
    (yt,), (dxt, dwt) = _grads(rms_norm_ref, [_leaf(x, dtype), _leaf(w, dtype)], [dy.to(dtype)])
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close_to_ref(y, y64, yt, name="y")
    assert_close_to_ref(dx, dx64, dxt, name="dx")
    assert_close_to_ref(dw, dw64, dwt, name="dweight")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(431, 256), (3, 16384), (5, 12288)])
def test_rms_norm_many_rows_and_wide_rows(shape):
    dtype = torch.bfloat16
    x, w, dy = torch.randn(shape), torch.rand(shape[-1]) + 0.5, torch.randn(shape)
    (y,), (dx, dw) = _grads(
        lambda a, b: rms_norm(a, b, backend="triton"), [_leaf(x, dtype), _leaf(w, dtype)], [dy]
    )
    (y64,), (dx64, dw64) = _grads(
        _rms_norm64, [_leaf(x, torch.float64), _leaf(w, torch.float64)], [dy.double()]
    )
    (yt,), (dxt, dwt) = _grads(rms_norm_ref, [_leaf(x, dtype), _leaf(w, dtype)], [dy.to(dtype)])
    assert_close_to_ref(y, y64, yt, name="y")
    assert_close_to_ref(dx, dx64, dxt, name="dx")
    assert_close_to_ref(dw, dw64, dwt, name="dweight")


def test_rms_norm_fp32_weight_with_bf16_activations_and_strided_input():
    # Mixed precision: fp32 master weight, bf16 activations; x is a non-contiguous view.
    base = torch.randn(40, 2 * 96)
    x = base[:, ::2].to(torch.bfloat16).requires_grad_()
    w = (torch.rand(96) + 0.5).requires_grad_()
    dy = torch.randn(40, 96)
    (y,), (dx, dw) = _grads(lambda a, b: rms_norm(a, b, backend="triton"), [x, w], [dy])
    (y64,), (dx64, dw64) = _grads(
        _rms_norm64, [_leaf(x.detach(), torch.float64), _leaf(w.detach(), torch.float64)], [dy.double()]
    )
    (yt,), (dxt, dwt) = _grads(
        rms_norm_ref, [_leaf(x.detach(), torch.bfloat16), _leaf(w.detach(), torch.float32)], [dy]
    )
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close_to_ref(y, y64, yt, name="y")
    assert_close_to_ref(dx, dx64, dxt, name="dx")
    assert_close_to_ref(dw, dw64, dwt, name="dweight")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 64), (123, 300)])
def test_rms_norm_residual_gradients_through_both_outputs(shape, dtype):
    x, r, w = torch.randn(shape), torch.randn(shape), torch.rand(shape[-1]) + 0.5
    dy, dh = torch.randn(shape), torch.randn(shape)

    def run(fn, dt):
        return _grads(fn, [_leaf(x, dt), _leaf(r, dt), _leaf(w, dt)], [dy.to(dt), dh.to(dt)])

    (y, h), (dx, dr, dw) = run(lambda a, b, c: rms_norm_residual(a, b, c, backend="triton"), dtype)
    (y64, h64), (dx64, dr64, dw64) = run(_rms_norm_residual64, torch.float64)
    (yt, ht), (dxt, drt, dwt) = run(rms_norm_residual_ref, dtype)
    for name, a, b, c in [
        ("y", y, y64, yt),
        ("h", h, h64, ht),
        ("dx", dx, dx64, dxt),
        ("dres", dr, dr64, drt),
    ]:
        assert_close_to_ref(a, b, c, name=name)
    assert_close_to_ref(dw, dw64, dwt, name="dweight")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(6, 64), (2, 21, 136)])
def test_autocast_block_layout_fp32_residual_bf16_branch_bf16_output(shape):
    """The model's block under autocast: h = x (fp32 residual stream) + a (bf16 branch output), the
    norm of h handed to the next linears in bf16. h stays fp32, y comes out bf16, and each input gets
    its gradient in its own dtype; y's error is bf16 rounding of the exact result."""
    x, a, w = torch.randn(shape), torch.randn(shape), torch.rand(shape[-1]) + 0.5
    dy, dh = torch.randn(shape), torch.randn(shape)

    def run(fn, dt_x, dt_a, dt_w):
        ins = [_leaf(a, dt_a), _leaf(x, dt_x), _leaf(w, dt_w)]
        return _grads(fn, ins, [dy.to(torch.bfloat16 if dt_x != torch.float64 else dt_x), dh.to(dt_x)])

    bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64
    (y, h), (da, dx, dw) = run(
        lambda p, q, r: rms_norm_residual(p, q, r, out_dtype=bf16, backend="triton"), f32, bf16, f32
    )
    (y64, h64), (da64, dx64, dw64) = run(_rms_norm_residual64, f64, bf16, f64)
    (yt, ht), (dat, dxt, dwt) = run(
        lambda p, q, r: rms_norm_residual_ref(p, q, r, out_dtype=bf16), f32, bf16, f32
    )
    assert (y.dtype, h.dtype, da.dtype, dx.dtype, dw.dtype) == (bf16, f32, bf16, f32, f32)
    for name, got, exact, ref in [
        ("y", y, y64, yt),
        ("h", h, h64, ht),
        ("dbranch", da, da64, dat),
        ("dresidual", dx, dx64, dxt),
        ("dweight", dw, dw64, dwt),
    ]:
        assert_close_to_ref(got, exact, ref, name=name)


def test_rms_norm_out_dtype_is_the_rounded_fp32_result():
    # One bf16 ulp, not bits: the interpreter's fp32->bf16 store truncates where the GPU rounds.
    x, w = torch.randn(37, 200), torch.rand(200) + 0.5
    y = rms_norm(x, w, out_dtype=torch.bfloat16, backend="triton")
    assert y.dtype == torch.bfloat16
    y32 = rms_norm(x, w, backend="triton")
    torch.testing.assert_close(y.float(), y32, rtol=2**-7, atol=0)
    torch.testing.assert_close(
        rms_norm_ref(x, w, out_dtype=torch.bfloat16), y32.to(torch.bfloat16), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("use", ["y", "h"])
def test_rms_norm_residual_one_output_used(use):
    x, r = torch.randn(7, 50, requires_grad=True), torch.randn(7, 50, requires_grad=True)
    w = torch.rand(50, requires_grad=True)
    g = torch.randn(7, 50)
    i = 0 if use == "y" else 1
    got = torch.autograd.grad(
        (rms_norm_residual(x, r, w, backend="triton")[i] * g).sum(), (x, r, w), allow_unused=True
    )
    want = torch.autograd.grad((rms_norm_residual_ref(x, r, w)[i] * g).sum(), (x, r, w), allow_unused=True)
    for a, b in zip(got, want):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(4, 8), torch.randn(7), backend="triton")
    with pytest.raises(ValueError, match="residual"):
        rms_norm_residual(torch.randn(4, 8), torch.randn(4, 9), torch.randn(8), backend="triton")


def test_auto_backend_uses_reference_on_cpu():
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w), rtol=0, atol=0)
