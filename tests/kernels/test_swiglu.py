"""SwiGLU: Triton (interpreter on CPU) against a float64 reference."""

import pytest
import torch
from kernel_checks import assert_close_to_ref

from llama3hp.kernels.swiglu import BLOCK_SIZE, swiglu, swiglu_ref

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
    # One element past a whole block; gates far in both tails of the sigmoid.
    n = BLOCK_SIZE + 1
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
    w13 = torch.randn(10, 2 * 48, requires_grad=True)
    gate, up = w13.chunk(2, dim=-1)
    got = torch.autograd.grad(swiglu(gate, up, backend="triton").sum(), w13)[0]
    want = torch.autograd.grad(swiglu_ref(gate, up).sum(), w13)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5), backend="triton")
