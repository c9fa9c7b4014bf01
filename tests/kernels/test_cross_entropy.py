"""Fused linear cross-entropy: chunked GEMMs + Triton loss/dlogits kernel against a float64 reference."""

import pytest
import torch
from kernel_checks import assert_close_to_ref

import llama3hp.kernels.cross_entropy as ce
from llama3hp.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

# The kernel upcasts logits at load (bf16 included); the GEMMs are torch's.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _lce64(hidden, weight, targets, *, ignore_index=-100, reduction="mean", z_loss_scale=0.0):
    logits = hidden.double() @ weight.double().T
    valid = targets != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    tgt = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    loss = torch.where(valid, lse - tgt + z_loss_scale * lse**2, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum().clamp(min=1)


def _inputs(n, d, v, ignore_every=5):
    hidden = torch.randn(n, d)
    weight = torch.randn(v, d) / d**0.5 * 2
    targets = torch.randint(0, v, (n,))
    targets[::ignore_every] = -100
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, grad_out, dtype, **kw):
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    loss = fn(h, w, targets, **kw)
    return (loss, *torch.autograd.grad((loss.double() * grad_out.double()).sum(), (h, w)))


def _check_all(hidden, weight, targets, dtype, chunk_size, **kw):
    n = hidden.shape[0]
    # "none" gets a non-uniform per-row grad_output; the scalar reductions a non-unit one.
    grad_out = torch.rand(n) + 0.5 if kw.get("reduction") == "none" else torch.tensor(1.7)
    got = _run(
        lambda *a, **k: linear_cross_entropy(*a, **k, chunk_size=chunk_size, backend="triton"),
        hidden, weight, targets, grad_out, dtype, **kw,
    )  # fmt: skip
    want = _run(_lce64, hidden, weight, targets, grad_out, torch.float64, **kw)
    base = _run(linear_cross_entropy_ref, hidden, weight, targets, grad_out, dtype, **kw)
    assert got[0].dtype == torch.float32
    assert_close_to_ref(got[0], want[0], base[0].float(), name="loss", atol_ulps=64)  # fp32 sums over rows
    assert_close_to_ref(got[1], want[1], base[1], name="grad_hidden")
    assert_close_to_ref(got[2], want[2], base[2], name="grad_weight")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_float64_reference(reduction, dtype):
    # 42 rows in chunks of 16 (the last one partial), vocabulary not a power of two.
    hidden, weight, targets = _inputs(42, 24, 300)
    _check_all(hidden, weight, targets, dtype, 16, reduction=reduction)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_z_loss_and_custom_ignore_index(reduction):
    hidden, weight, targets = _inputs(23, 16, 129, ignore_every=3)
    targets[targets == -100] = 7  # 7 is now the ignored class
    targets[1] = 8
    _check_all(
        hidden, weight, targets, torch.float32, 8, reduction=reduction, ignore_index=7, z_loss_scale=1e-2
    )


def test_online_softmax_across_many_vocab_blocks(monkeypatch):
    # Shrink the vocabulary block so each row streams through 8 blocks, large logits included.
    monkeypatch.setattr(ce, "_launch_config", lambda v: (4, 128, 4))
    hidden, weight, targets = _inputs(12, 16, 1000)
    _check_all(hidden * 4, weight, targets, torch.float32, 5, reduction="none", z_loss_scale=1e-3)
    _check_all(hidden * 4, weight, targets, torch.float16, 5, reduction="mean")


def test_default_chunking_and_one_chunk_equal_many_chunks():
    hidden, weight, targets = _inputs(123, 32, 500)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    l1 = linear_cross_entropy(h1, w1, targets, backend="triton")  # one chunk (default budget)
    l2 = linear_cross_entropy(h2, w2, targets, chunk_size=10, chunk_bytes=1, backend="triton")
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)
    assert ce.chunk_rows(16384, 128256, 2, ce.DEFAULT_CHUNK_BYTES) == 1024


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    hidden, weight, _ = _inputs(9, 8, 50)
    targets = torch.full((9,), -100)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = linear_cross_entropy(h, w, targets, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("which", ["hidden", "weight", "neither"])
def test_gradients_only_where_required(which):
    hidden, weight, targets = _inputs(17, 8, 40)
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    loss = linear_cross_entropy(h, w, targets, reduction="sum", chunk_size=6, backend="triton")
    torch.testing.assert_close(loss, linear_cross_entropy_ref(hidden, weight, targets, reduction="sum"))
    if which == "neither":
        assert not loss.requires_grad
        return
    leaf = h if which == "hidden" else w
    (got,) = torch.autograd.grad(loss, leaf)
    ref_leaf = leaf.detach().clone().requires_grad_()
    args = (ref_leaf, weight) if which == "hidden" else (hidden, ref_leaf)
    (want,) = torch.autograd.grad(linear_cross_entropy_ref(*args, targets, reduction="sum"), ref_leaf)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_grad_evaluation_returns_loss():
    hidden, weight, targets = _inputs(11, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, targets, backend="triton")
    torch.testing.assert_close(loss, linear_cross_entropy_ref(hidden, weight, targets))


def test_rejects_out_of_range_targets_and_bad_reduction():
    hidden, weight, targets = _inputs(4, 8, 10)
    targets[2] = 10
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_cross_entropy(hidden, weight, targets, backend="triton")
    with pytest.raises(ValueError, match="unknown reduction"):
        linear_cross_entropy(hidden, weight, targets.clamp(max=9), reduction="avg", backend="triton")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_under_autocast_fp32_inputs_run_low_precision_gemms_and_return_fp32_grads(reduction):
    """The trainer's CUDA step: fp32 hidden states and master weight under autocast(bf16). The GEMMs
    must run in bf16 (like the nn.Linear the loss replaces), forward and backward, whether or not the
    backward sees autocast (on CUDA it never does), and the gradients come back in fp32."""
    from tests.gemm_dtypes import GemmDtypes

    hidden, weight, targets = _inputs(42, 24, 300)
    grad_out = torch.rand(42) + 0.5 if reduction == "none" else torch.tensor(1.7)
    want = _run(_lce64, hidden, weight, targets, grad_out, torch.float64, reduction=reduction)
    runs = []
    dev = hidden.device.type  # CUDA when a GPU runs this (tests/kernels/conftest.py)
    for backward_in_autocast in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        gemms = GemmDtypes()
        with gemms, torch.autocast(dev, dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=16, backend="triton")
        with gemms, torch.autocast(dev, dtype=torch.bfloat16, enabled=backward_in_autocast):
            gh, gw = torch.autograd.grad((loss.double() * grad_out.double()).sum(), (h, w))
        assert loss.dtype == gh.dtype == gw.dtype == torch.float32
        assert gemms.records and not gemms.in_dtype(torch.float32), gemms.in_dtype(torch.float32)[:3]
        runs.append((loss, gh, gw))
    for a, b in zip(*runs):  # the ambient autocast state in backward changes nothing
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast(dev, dtype=torch.bfloat16):  # PyTorch's own error at the same precision
        base = _run(
            linear_cross_entropy_ref, hidden, weight, targets, grad_out, torch.float32, reduction=reduction
        )
    for got, exp, ref, name in zip(runs[0], want, base, ("loss", "grad_hidden", "grad_weight")):
        assert_close_to_ref(got, exp, ref, name=name, atol_ulps=64)
