"""RoPE: one Triton launch for q and k (interpreter on CPU) against a float64 reference."""

import pytest
import torch
from kernel_checks import assert_close_to_ref

from llama3hp.kernels.rope import apply_rope, apply_rope_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, Hq, Hk, D): GQA and MHA, head dims 16 (small), 64 and 128.
SHAPES = [(2, 12, 4, 2, 16), (1, 23, 6, 2, 64), (2, 5, 8, 8, 128)]


def _inv_freq(d, theta=500000.0):
    # Llama 3.1-style scaling (low frequencies divided by 8) so the kernel reads, not derives, them.
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.where(inv < 1e-3, inv / 8, inv).float()


def _packed_positions(b, t):
    # Positions restart at every document boundary inside a packed row.
    pos = torch.empty(b, t, dtype=torch.int64)
    for row in range(b):
        cuts = sorted(torch.randperm(t - 1)[:2].add(1).tolist())
        bounds = [0, *cuts, t]
        for s, e in zip(bounds[:-1], bounds[1:]):
            pos[row, s:e] = torch.arange(e - s) + torch.randint(0, 4000, ()).item() * (row == 0)
    return pos


def _rope64(q, k, positions, inv_freq):
    angles = positions.double()[..., None] * inv_freq.double()
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]

    def rot(x):
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rot(q), rot(k)


def _run(fn, q, k, positions, inv_freq, dq, dk, dtype):
    q, k = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    qo, ko = fn(q, k, positions, inv_freq)
    total = (qo.double() * dq.double()).sum() + (ko.double() * dk.double()).sum()
    return (qo, ko, *torch.autograd.grad(total, (q, k)))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_float64_reference(shape, dtype):
    b, t, hq, hk, d = shape
    q, k = torch.randn(b, t, hq, d), torch.randn(b, t, hk, d)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos, inv = _packed_positions(b, t), _inv_freq(d)
    got = _run(lambda *a: apply_rope(*a, backend="triton"), q, k, pos, inv, dq, dk, dtype)
    want = _run(_rope64, q, k, pos, inv, dq, dk, torch.float64)
    base = _run(apply_rope_ref, q, k, pos, inv, dq, dk, dtype)
    for name, a, b64, bt in zip(["q", "k", "dq", "dk"], got, want, base):
        assert a.dtype == dtype
        assert_close_to_ref(a, b64, bt, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_inplace_mutates_and_keeps_gradients(dtype):
    b, t, hq, hk, d = 2, 7, 4, 2, 32
    q0 = torch.randn(b, t, hq, d, dtype=dtype, requires_grad=True)
    k0 = torch.randn(b, t, hk, d, dtype=dtype, requires_grad=True)
    pos, inv = torch.randint(0, 50, (b, t), dtype=torch.int32), _inv_freq(d)
    dq, dk = torch.randn(b, t, hq, d), torch.randn(b, t, hk, d)
    q, k = q0 * 1, k0 * 1  # non-leaf tensors, as the model's projections are
    version = q._version
    qo, ko = apply_rope(q, k, pos, inv, inplace=True, backend="triton")
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr() and q._version > version
    got = torch.autograd.grad((qo.float() * dq).sum() + (ko.float() * dk).sum(), (q0, k0))
    qr, kr = apply_rope_ref(q0, k0, pos, inv)
    want = torch.autograd.grad((qr.float() * dq).sum() + (kr.float() * dk).sum(), (q0, k0))
    tol = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(qo, qr, **tol)
    torch.testing.assert_close(ko, kr, **tol)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, **tol)


@pytest.mark.usefixtures("poison_empty")
def test_rope_strided_views_of_fused_qkv():
    # q and k as views into one [B, T, (Hq + 2 Hk) * D] projection output: non-contiguous heads.
    b, t, hq, hk, d = 2, 9, 4, 2, 16
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, requires_grad=True)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d)
    assert not q.is_contiguous()
    pos, inv = _packed_positions(b, t), _inv_freq(d)
    qo, ko = apply_rope(q, k, pos, inv, backend="triton")
    qr, kr = apply_rope_ref(q, k, pos, inv)
    torch.testing.assert_close(qo, qr, rtol=0, atol=1e-5)
    torch.testing.assert_close(ko, kr, rtol=0, atol=1e-5)
    g = torch.randn(b, t, hq, d)
    got = torch.autograd.grad((qo * g).sum() + ko.sum(), qkv)[0]
    want = torch.autograd.grad((qr * g).sum() + kr.sum(), qkv)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_rope_rejects_bad_inputs():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(q, k, torch.zeros(1, 5, dtype=torch.long), _inv_freq(8), backend="triton")
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(q, k, torch.zeros(1, 4, dtype=torch.long), _inv_freq(16), backend="triton")
    with pytest.raises(ValueError, match="even head dim"):
        apply_rope(
            torch.randn(1, 4, 2, 7),
            torch.randn(1, 4, 1, 7),
            torch.zeros(1, 4, dtype=torch.long),
            _inv_freq(6),
        )


def test_inplace_on_views_that_require_grad_is_refused():
    qkv = torch.randn(1, 4, 3 * 2 * 8, requires_grad=True) * 1.0
    q = qkv[..., :16].view(1, 4, 2, 8)
    k = qkv[..., 16:32].view(1, 4, 2, 8)
    pos = torch.arange(4)[None]
    inv_freq = torch.rand(4)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="inplace=False"):
            apply_rope(q, k, pos, inv_freq, inplace=True, backend=backend)
