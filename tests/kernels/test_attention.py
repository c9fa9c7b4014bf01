"""Document-masked flash attention (kernels/attention/) against float64 references.

Runs the Triton kernels under the interpreter on CPU (fp16/fp32; the interpreter has no bf16) with
tiny shapes and 16x16 tiles. Every kernel output buffer is NaN-poisoned before launch, so an
element a kernel forgets to write fails the test. Tolerance: the kernel's max error against the
float64 reference is at most 2x the error of PyTorch's own attention in the same dtype + atol.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from llama3hp.kernels.attention import (
    attention,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    common,
)
from llama3hp.parallel.context import build_cp_query_segments

# `llama3hp.kernels.attention` the attribute is the function; the module is reached by name.
attn = importlib.import_module("llama3hp.kernels.attention")

ATOL = {torch.float16: 2e-3, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(common, "_new_output", nan_output)  # where both launchers allocate


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _random_row(T: int, rng: random.Random) -> list[int]:
    """Document lengths of one row of T tokens: random cuts, at least one length-1 document."""
    cuts = sorted(rng.sample(range(1, T), k=min(3, T - 1)))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, T])]
    if 1 not in lengths and T > 2:
        lengths = [1, lengths[0] - 1, *lengths[1:]] if lengths[0] > 1 else lengths
    return [n for n in lengths if n > 0]


# Rows of T tokens each; T = 43 is not a multiple of the 16-token tile.
LAYOUTS = {
    "one_doc_per_row": (43, [[43], [43]]),
    "mixed": (43, [[1, 17, 25], [43]]),  # length-1 doc, docs crossing tiles, a doc filling the row
    "random": (48, [_random_row(48, random.Random(1)), _random_row(48, random.Random(2))]),
}
GQA = [(2, 2, 32), (4, 1, 32), (16, 1, 16)]  # (q heads, kv heads, head dim): ratios 1, 4, 16


def _inputs(B, T, Hq, Hk, D, dtype):
    q = torch.randn(B, T, Hq, D, dtype=dtype)
    k = torch.randn(B, T, Hk, D, dtype=dtype)
    v = torch.randn(B, T, Hk, D, dtype=dtype)
    return q, k, v


def _grads(out, tensors, dout):
    return torch.autograd.grad(out, tensors, dout)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_close(name, got, ref64, torch_same_dtype, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or invalid element)"
    bound = 2 * _max_err(torch_same_dtype, ref64) + ATOL[dtype]
    err = _max_err(got, ref64)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def _run_and_compare(q, k, v, cu, max_seqlen, dtype, *, deterministic=False):
    tensors = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*tensors, cu, max_seqlen=max_seqlen, deterministic=deterministic, backend="triton")
    dout = torch.randn_like(out)
    grads = _grads(out, tensors, dout)

    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = attention_ref(*t64, cu)
    grads64 = _grads(out64, t64, dout.double())

    tlow = [t.detach().requires_grad_() for t in (q, k, v)]
    out_low = attention_ref(*tlow, cu)
    grads_low = _grads(out_low, tlow, dout)

    _check_close("out", out, out64, out_low, dtype)
    for name, g, g64, glow in zip(("dq", "dk", "dv"), grads, grads64, grads_low):
        _check_close(name, g, g64, glow, dtype)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("heads", GQA, ids=[f"gqa{hq // hk}" for hq, hk, _ in GQA])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_backward_matches_reference(layout, heads, dtype):
    T, rows = LAYOUTS[layout]
    Hq, Hk, D = heads
    lengths = [n for row in rows for n in row]
    q, k, v = _inputs(len(rows), T, Hq, Hk, D, dtype)
    _run_and_compare(q, k, v, _cu(lengths), max(lengths), dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama_head_dims(head_dim):
    q, k, v = _inputs(1, 21, 2, 1, head_dim, torch.float16)
    _run_and_compare(q, k, v, _cu([4, 17]), 17, torch.float16)


def test_no_cu_seqlens_is_causal_per_row():
    q, k, v = _inputs(2, 37, 4, 2, 32, torch.float32)
    tensors = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*tensors, backend="triton")
    ref = attention_ref(*(t.double() for t in (q, k, v)))
    assert _max_err(out, ref) < 2e-5
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in tensors)


def test_deterministic_mode_bit_identical_and_correct():
    T, rows = LAYOUTS["mixed"]
    q, k, v = _inputs(2, T, 4, 1, 32, torch.float16)
    cu = _cu([n for row in rows for n in row])
    _run_and_compare(q, k, v, cu, 43, torch.float16, deterministic=True)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        tensors = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*tensors, cu, max_seqlen=43, deterministic=True, backend="triton")
        runs.append((out, *_grads(out, tensors, dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _dense_lse64(q, k, cu, scale):
    """Float64 log-sum-exp [Hq, N] of document-causal scores; q [N, Hq, D], k [N, Hk, D]."""
    N, Hq, _ = q.shape
    doc = attn.document_ids(cu, N)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(N, N, dtype=torch.bool).tril()
    kk = k.double().repeat_interleave(Hq // k.shape[1], 1)
    scores = torch.einsum("nhd,mhd->hnm", q.double(), kk) * scale
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)


def test_lse_and_its_gradient_match_reference():
    lengths = [1, 17, 25, 20, 23]
    N, Hq, Hk, D = sum(lengths), 4, 2, 32
    cu = _cu(lengths)
    q = torch.randn(N, Hq, D, requires_grad=True)
    k = torch.randn(N, Hk, D, requires_grad=True)
    v = torch.randn(N, Hk, D, requires_grad=True)
    out, lse = attention_varlen(q, k, v, cu, cu, 25, 25, softmax_scale=0.3, return_lse=True, backend="triton")
    lse64 = _dense_lse64(q.detach(), k.detach(), cu, 0.3)
    assert lse.dtype == torch.float32 and lse.shape == (Hq, N)
    assert _max_err(lse, lse64) < 2e-5
    # Merging partial results (context parallelism) back-propagates through the LSE.
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = attention_ref(*(t[None] for t in t64), cu, softmax_scale=0.3)[0]
    loss64 = (out64 * dout.double()).sum() + (_dense_lse64(t64[0], t64[1], cu, 0.3) * dlse.double()).sum()
    for g, g64 in zip(grads, torch.autograd.grad(loss64, t64)):
        assert _max_err(g, g64) < 5e-5


def test_varlen_reference_matches_sdpa_reference():
    lengths = [5, 11, 1, 15]
    q, k, v = _inputs(1, 32, 4, 2, 16, torch.float64)
    cu = _cu(lengths)
    out, lse = attention_varlen_ref(q[0], k[0], v[0], cu, cu)
    assert _max_err(out, attention_ref(q, k, v, cu)[0]) < 1e-12
    assert _max_err(lse, _dense_lse64(q[0], k[0], cu, 16**-0.5)) < 1e-6


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_context_parallel_offsets_match_full_sequence(deterministic):
    """cp=2: each row is cut into 4 chunks, rank i holds chunks i and 3-i and attends its queries to
    the all-gathered K/V; outputs and summed gradients must equal the full-sequence reference."""
    cp, B, T, Hq, Hk, D = 2, 2, 48, 4, 2, 32
    rows = [[20, 27, 1], [7, 41]]  # documents cross chunk boundaries (chunks of 12 tokens)
    cu = _cu([n for row in rows for n in row])
    q, k, v = _inputs(B, T, Hq, Hk, D, torch.float32)
    qf, kf, vf = (t.reshape(B * T, t.shape[2], D) for t in (q, k, v))
    chunk = T // (2 * cp)
    tk, tv = kf.detach().requires_grad_(), vf.detach().requires_grad_()
    dout = torch.randn(B * T, Hq, D)
    dq_full = torch.full_like(qf, float("nan"))
    out_full = torch.full_like(qf, float("nan"))
    dk_sum, dv_sum = torch.zeros_like(kf), torch.zeros_like(vf)
    for rank in range(cp):
        ranges = [
            (b * T + c * chunk, b * T + (c + 1) * chunk) for b in range(B) for c in (rank, 2 * cp - 1 - rank)
        ]
        idx = torch.cat([torch.arange(a, e) for a, e in ranges])
        seg = build_cp_query_segments(cu, ranges)
        q_local = qf[idx].detach().requires_grad_()
        out = attention_varlen(
            q_local, tk, tv, seg.cu_seqlens_q, cu, seg.max_seqlen_q, max(max(r) for r in rows),
            q_doc_idx=seg.q_doc_idx, q_pos_offsets=seg.q_pos_offsets, deterministic=deterministic,
            backend="triton",
        )  # fmt: skip
        dq, dk, dv = torch.autograd.grad(out, (q_local, tk, tv), dout[idx])
        out_full[idx], dq_full[idx] = out.detach(), dq
        dk_sum += dk
        dv_sum += dv

    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = attention_ref(*t64, cu)
    dq64, dk64, dv64 = torch.autograd.grad(out64, t64, dout.view(B, T, Hq, D).double())
    assert _max_err(out_full, out64.reshape_as(qf)) < 2e-5
    assert _max_err(dq_full, dq64.reshape_as(qf)) < 5e-5
    assert _max_err(dk_sum, dk64.reshape_as(kf)) < 5e-5
    assert _max_err(dv_sum, dv64.reshape_as(vf)) < 5e-5


def test_build_cp_query_segments_splits_at_documents():
    cu = _cu([5, 10, 1])  # documents [0, 5), [5, 15), [15, 16)
    seg = build_cp_query_segments(cu, [(3, 8), (12, 16)])
    assert seg.cu_seqlens_q.tolist() == [0, 2, 5, 8, 9]
    assert seg.q_doc_idx.tolist() == [0, 1, 1, 2]
    assert seg.q_pos_offsets.tolist() == [3, 0, 7, 0]
    assert seg.max_seqlen_q == 3
    with pytest.raises(ValueError, match="outside"):
        build_cp_query_segments(cu, [(10, 20)])


def test_key_documents_without_queries_get_zero_gradients():
    # Segment 0 uses document 1 only; document 0's keys are never attended: dK = dV = 0 there.
    q = torch.randn(6, 2, 16, requires_grad=True)
    k = torch.randn(20, 1, 16, requires_grad=True)
    v = torch.randn(20, 1, 16, requires_grad=True)
    cu_q, cu_k = _cu([6]), _cu([8, 12])
    doc, pos = torch.tensor([1], dtype=torch.int32), torch.tensor([4], dtype=torch.int32)
    out = attention_varlen(q, k, v, cu_q, cu_k, 6, 12, q_doc_idx=doc, q_pos_offsets=pos, backend="triton")
    ref, _ = attention_varlen_ref(
        q.double(), k.double(), v.double(), cu_q, cu_k, q_doc_idx=doc, q_pos_offsets=pos
    )
    assert _max_err(out, ref) < 2e-5
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dk[:8], torch.zeros_like(dk[:8])) and torch.equal(dv[:8], torch.zeros_like(dv[:8]))
    assert dk[8:].abs().sum() > 0 and torch.isfinite(dq).all()


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v = _inputs(2, 16, 4, 2, 16, torch.float32)
    cu = _cu([3, 13, 16])
    assert torch.equal(attention(q, k, v, cu), attention_ref(q, k, v, cu))
    assert torch.equal(attention(q, k, v, cu, backend="torch"), attention_ref(q, k, v, cu))


def test_bad_inputs_raise_clear_errors():
    q, k, v = _inputs(1, 16, 4, 2, 24, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        attention(q, k, v, backend="triton")
    q, k, v = _inputs(1, 16, 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(q, k, v, backend="triton")
    q, k, v = _inputs(1, 16, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q, k, v, _cu([3, 10]), backend="triton")
    with pytest.raises(ValueError, match="q_doc_idx"):
        attention_varlen(q[0], k[0], v[0], _cu([8, 8]), _cu([16]), 8, 16, backend="triton")
    with pytest.raises(ValueError, match="q_pos_offsets"):
        attention_varlen(
            q[0], k[0], v[0], _cu([16]), _cu([16]), 16, 16, q_pos_offsets=torch.tensor([-1]), backend="triton"
        )
    with pytest.raises(ValueError, match="unknown kernel backend"):
        attention(q, k, v, backend="cuda")


# Shared-prompt packing: [prompt | chosen | rejected] as three documents, the responses naming the prompt
# (index 1 of each row: a short document before it, lengths not multiples of the 16-token tile).
PREFIX_ROWS = [[5, 19, 11, 13], [9, 23, 16]]  # row 0: doc, prompt, chosen, rejected; row 1: prompt, c, r
PREFIX = [-1, -1, 1, 1, -1, 4, 4]


def _prefix_case(dtype, Hq=4, Hk=2, D=32):
    lengths = [n for row in PREFIX_ROWS for n in row]
    q, k, v = _inputs(2, 48, Hq, Hk, D, dtype)
    return q, k, v, _cu(lengths), max(lengths), torch.tensor(PREFIX, dtype=torch.int32)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_shared_prefix_matches_reference(dtype, deterministic):
    q, k, v, cu, max_len, prefix = _prefix_case(dtype)
    tensors = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*tensors, cu, max_seqlen=max_len, doc_prefix=prefix, deterministic=deterministic,
                    backend="triton")  # fmt: skip
    dout = torch.randn_like(out)
    grads = _grads(out, tensors, dout)
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = attention_ref(*t64, cu, doc_prefix=prefix)
    grads64 = _grads(out64, t64, dout.double())
    tlow = [t.detach().requires_grad_() for t in (q, k, v)]
    out_low = attention_ref(*tlow, cu, doc_prefix=prefix)
    grads_low = _grads(out_low, tlow, dout)
    _check_close("out", out, out64, out_low, dtype)
    for name, g, g64, glow in zip(("dq", "dk", "dv"), grads, grads64, grads_low):
        _check_close(name, g, g64, glow, dtype)


def test_shared_prefix_equals_the_two_sequences_run_apart():
    """The rejected response after a shared prompt computes exactly what [prompt | rejected] alone does
    (and the chosen what [prompt | chosen] does): it never sees the chosen tokens."""
    q, k, v, cu, _, prefix = _prefix_case(torch.float64, Hq=2, Hk=1, D=16)
    out = attention_ref(q, k, v, cu, doc_prefix=prefix)
    P, C, R = PREFIX_ROWS[1]
    row = slice(0, P)
    for start, n in ((P, C), (P + C, R)):
        idx = torch.cat([torch.arange(P), torch.arange(start, start + n)])
        alone = attention_ref(q[1:, idx], k[1:, idx], v[1:, idx])
        assert _max_err(out[1:, start : start + n], alone[:, P:]) < 1e-12
        assert _max_err(out[1:, row], alone[:, row]) < 1e-12
    # The varlen reference (what the long-row path and the kernel tests use) agrees with the dense mask.
    flat = [t.reshape(96, t.shape[2], 16) for t in (q, k, v)]
    out_v, _ = attention_varlen_ref(*flat, cu, cu, doc_prefix=prefix)
    assert _max_err(out_v, out.reshape(96, 2, 16)) < 1e-12


def test_shared_prefix_bad_inputs():
    q, k, v, cu, max_len, _ = _prefix_case(torch.float32)
    with pytest.raises(ValueError, match="earlier document"):
        attention(q, k, v, cu, max_seqlen=max_len, doc_prefix=torch.tensor([-1, 2, 1, 1, -1, 4, 4]),
                  backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="one entry per key document"):
        attention(q, k, v, cu, max_seqlen=max_len, doc_prefix=torch.tensor([-1, 0]), backend="triton")
