"""Fused chunked log-probabilities (kernels/logprobs.py) against a float64 reference: the Triton
kernels under the interpreter, odd row counts in chunks smaller than the batch, ignored rows."""

import pytest
import torch
from kernel_checks import assert_close_to_ref

from llama3hp.kernels.logprobs import LinearLogprobsFunction, linear_logprobs, linear_logprobs_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernels upcast at load; GEMMs are torch's


def _logp64(hidden, weight, targets, cu_seqlens=None):
    out = linear_logprobs_ref(hidden.double(), weight.double(), targets, cu_seqlens=cu_seqlens)
    assert out.dtype == torch.float32  # the reference returns fp32 like the kernel: redo it in fp64
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    tok = torch.where(targets != -100, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    if cu_seqlens is None:
        return tok
    return torch.stack([tok[s:e].sum() for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())])


def _inputs(n, d, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * 2
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, grad_out, dtype):
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    out = fn(h, w, targets)
    return (out, *torch.autograd.grad((out.double() * grad_out.double()).sum(), (h, w)))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", ["triton", "auto"])  # auto on CPU: the chunked Function, torch reductions
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [6, 42, 123])
def test_linear_logprobs_match_float64_reference(n, dtype, backend):
    if backend == "auto" and torch.cuda.is_available():
        pytest.skip("auto is the Triton path on CUDA")
    hidden, weight, targets = _inputs(n, 24, 300)  # vocabulary not a power of two
    grad_out = torch.rand(n) + 0.5
    got = _run(lambda *a: linear_logprobs(*a, chunk_size=16, backend=backend), hidden, weight, targets,
               grad_out, dtype)  # fmt: skip
    want = _run(lambda *a: _logp64(*a), hidden, weight, targets, grad_out, torch.float64)
    base = _run(linear_logprobs_ref, hidden, weight, targets, grad_out, dtype)
    assert got[0].dtype == torch.float32
    assert_close_to_ref(got[0], want[0], base[0].float(), name="logp", atol_ulps=16)
    assert_close_to_ref(got[1], want[1], base[1], name="grad_hidden")
    assert_close_to_ref(got[2], want[2], base[2], name="grad_weight")
    ignored = targets == -100
    assert torch.equal(got[0][ignored], torch.zeros(int(ignored.sum())))
    assert torch.equal(got[1][ignored], torch.zeros_like(got[1][ignored]))  # dropped before the GEMM


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_and_unpacked_sequences_give_equal_sums(backend):
    """Three sequences packed into one row (cu_seqlens) and the same sequences one per row sum alike."""
    hidden, weight, targets = _inputs(37, 16, 97, seed=1)
    cu = torch.tensor([0, 5, 25, 37])
    packed = linear_logprobs(hidden, weight, targets, cu_seqlens=cu, chunk_size=8, backend=backend)
    apart = torch.stack([
        linear_logprobs(hidden[s:e], weight, targets[s:e], chunk_size=8, backend=backend).sum()
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
    ])  # fmt: skip
    torch.testing.assert_close(packed, apart, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(packed, _logp64(hidden, weight, targets, cu).float(), rtol=1e-5, atol=1e-4)


def test_vocabulary_shards_combine_to_the_whole():
    """What each TP rank computes on its shard (targets on another shard give 0 and no one-hot), summed
    as the group's all-reduces would, equals the whole vocabulary's log-probabilities and gradients."""
    hidden, weight, targets = _inputs(19, 16, 64, seed=2)
    h = hidden.double().requires_grad_()
    whole = _logp64(h, weight, targets)
    keep = targets != -100
    lse = torch.logsumexp(h @ weight.double().T, -1)[keep]
    # Shard r's local pieces through the Function's helpers: its logsumexp and target logits.
    from llama3hp.kernels.logprobs import _chunk_grad_, _chunk_stats

    lses, tls = [], []
    for r in range(2):
        w_r = weight.double()[r * 32 : (r + 1) * 32]
        lse_r, t_r = _chunk_stats(h.detach()[keep] @ w_r.T, targets[keep] - r * 32, fused=False)
        lses.append(lse_r)
        tls.append(t_r)
    combined = torch.logsumexp(torch.stack(lses), 0)
    torch.testing.assert_close(combined, lse.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(tls) - combined, whole.detach()[keep], rtol=1e-12, atol=1e-12)
    g = torch.rand(int(keep.sum()), dtype=torch.float64)
    dh = sum(
        _chunk_grad_(h.detach()[keep] @ weight.double()[r * 32 : (r + 1) * 32].T, targets[keep] - r * 32,
                     combined, g, fused=False) @ weight.double()[r * 32 : (r + 1) * 32]
        for r in range(2)
    )  # fmt: skip
    (want,) = torch.autograd.grad((whole[keep] * g).sum(), h)
    torch.testing.assert_close(dh, want[keep], rtol=1e-10, atol=1e-10)


def test_chunks_bound_the_logits_held():
    """The chunk is sized so one chunk's fp32 logits fit chunk_bytes, whatever the number of rows."""
    seen = []
    mm = torch.Tensor.__matmul__

    def spy(a, b):
        out = mm(a, b)
        seen.append(tuple(out.shape))
        return out

    hidden, weight, targets = _inputs(50, 8, 40, seed=3)
    torch.Tensor.__matmul__ = spy
    try:
        h = hidden.requires_grad_()
        LinearLogprobsFunction.apply(
            h, weight, targets, -100, 0, None, 7, False, torch.float32
        ).sum().backward()
    finally:
        torch.Tensor.__matmul__ = mm
    logits = [s for s in seen if s[1] == 40]
    assert logits and max(s[0] for s in logits) <= 7
    assert sum(s[0] for s in logits) == 2 * int(
        (targets != -100).sum()
    )  # forward + recompute, kept rows only


def test_bad_inputs():
    hidden, weight, targets = _inputs(6, 8, 10)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_logprobs(hidden, weight, targets[:3], backend="triton")
    with pytest.raises(ValueError, match="targets must lie"):
        linear_logprobs(hidden, weight, torch.full((6,), 10), backend="triton")
