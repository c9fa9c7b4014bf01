"""SwiGLU: Triton (interpreter on CPU) against a float64 reference."""

import pytest
import torch
from kernel_checks import assert_close_to_ref

from llama3hp.kernels.swiglu import MAX_BLOCK_F, swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Element counts not multiples of the block; one spans several blocks.
SHAPES = [(6, 64), (42, 344), (431, 100), (2, 3, 1000)]


def _swiglu64(gate, up):
    g = gate.double()
    return g * torch.sigmoid(g) * up.double()


def _run(fn, gate, up, dout, dtype):
    g, u = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
    out = fn(g, u)
    return (out, *torch.autograd.grad((out.double() * dout.double()).sum(), (g, u)))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_float64_reference(shape, dtype):
    gate, up, dout = torch.randn(shape) * 3, torch.randn(shape), torch.randn(shape)
    got = _run(lambda a, b: swiglu(a, b, backend="triton"), gate, up, dout, dtype)
    want = _run(_swiglu64, gate, up, dout, torch.float64)
    base = _run(swiglu_ref, gate, up, dout, dtype)
    for name, a, b64, bt in zip(["out", "dgate", "dup"], got, want, base):
        assert a.dtype == dtype
        assert_close_to_ref(a, b64, bt, name=name)


def test_swiglu_block_tail_and_extreme_gates():
    # One column past a whole block; gates far in both tails of the sigmoid.
    n = MAX_BLOCK_F + 1
    gate = torch.linspace(-120.0, 120.0, n).requires_grad_()
    up = torch.randn(n).requires_grad_()
    out = swiglu(gate, up, backend="triton")
    ref = swiglu_ref(gate, up)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (gate, up))
    want = torch.autograd.grad(ref.sum(), (gate, up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_strided_halves_of_fused_projection():
    # The halves are read in place through their row stride, not copied.
    w13 = torch.randn(10, 2 * 48, requires_grad=True)
    gate, up = w13.chunk(2, dim=-1)
    out = swiglu(gate, up, backend="triton")
    got = torch.autograd.grad((out * out).sum(), w13)[0]
    want = torch.autograd.grad((swiglu_ref(gate, up) ** 2).sum(), w13)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _packed64(x):
    g, u = x.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


def _run_packed(fn, x, dout, dtype):
    xd = x.to(dtype).requires_grad_()
    out = fn(xd)
    return out, torch.autograd.grad((out.double() * dout.double()).sum(), xd)[0]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_packed_matches_float64_reference(shape, dtype):
    # x = [gate | up] per row, as the grouped w1/w3 GEMM writes it; one [..., 2F] gradient back.
    x = torch.cat([torch.randn(shape) * 3, torch.randn(shape)], dim=-1)
    dout = torch.randn(shape)
    got = _run_packed(lambda t: swiglu_packed(t, backend="triton"), x, dout, dtype)
    want = _run_packed(_packed64, x, dout, torch.float64)
    base = _run_packed(swiglu_packed_ref, x, dout, dtype)
    for name, a, b64, bt in zip(["out", "dx"], got, want, base):
        assert a.dtype == dtype and a.shape == b64.shape
        assert_close_to_ref(a, b64, bt, name=name)


def test_swiglu_packed_reads_padded_rows_and_odd_widths_fail():
    # Rows with a stride past 2F (a slice of a wider buffer), a width over one block, [B, T, 2F].
    n = MAX_BLOCK_F + 3
    wide = torch.randn(2, 3, 2 * n + 5)
    x = wide[..., : 2 * n].requires_grad_()
    out = swiglu_packed(x, backend="triton")
    ref = swiglu_packed_ref(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, x, dout)[0]
    torch.testing.assert_close(got, torch.autograd.grad(ref, x, dout)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2F\]"):
        swiglu_packed(torch.randn(4, 7), backend="triton")


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5), backend="triton")
