"""Objectives and the head's outputs on one process (every layout against one process: the
objective cases of tests/parallel/test_layouts.py)."""

import pytest
import torch
import torch.nn.functional as F

from llama3hp.data.batch import Batch
from llama3hp.model import ModelArgs, Transformer
from llama3hp.parallel import LocalModel
from llama3hp.train.objectives import MaskedNextTokenLoss, NextTokenLoss, ObjectiveOutput


def _model(dtype=torch.float64):
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16, ffn_dim_multiplier=None,
        max_seq_len=32, rope_scaling=False,
    )  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed=1)
    return model.to(dtype)


def _batch(seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 61, (2, 13), generator=g)
    targets = torch.randint(0, 61, (2, 13), generator=g)
    targets[0, 2] = targets[1, 7] = -100
    cu = torch.tensor([0, 4, 13, 14, 26], dtype=torch.int32)  # a document of one token, and a row start
    loss_mask = torch.rand(2, 13, generator=g) < 0.5 if mask else None
    return Batch(tokens, targets, cu, 12, loss_mask)


def test_document_logprobs_sum_the_targets_log_softmax_per_document():
    model, b = _model(), _batch()
    out = model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)
    logp = F.log_softmax(out.logits(), dim=-1).flatten(0, 1)
    t = b.targets.flatten()
    tok = torch.where(t != -100, logp[torch.arange(t.numel()), t.clamp(min=0)], 0.0)
    want = torch.stack(
        [tok[s:e].sum() for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist())]
    )
    torch.testing.assert_close(out.token_logprobs(b.targets), tok.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.document_logprobs(b), want.float(), rtol=1e-6, atol=1e-6)
    assert out.owned_documents(b).all() and out.owned_documents(b).numel() == 4
    # Without cu_seqlens each row is one document (and attention sees the whole row).
    whole = Batch(b.inputs, b.targets)
    out = model(whole.inputs)
    tok = out.token_logprobs(whole.targets)
    torch.testing.assert_close(out.document_logprobs(whole), torch.stack([tok[:13].sum(), tok[13:].sum()]))
    assert out.owned_documents(whole).tolist() == [True, True]


def test_document_logprobs_have_the_gradient_of_the_reference():
    model, b = _model(), _batch()
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float32)
    out = model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)
    (out.document_logprobs(b) * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen).logits()
    per_tok = -F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100, reduction="none")
    doc = torch.searchsorted(b.cu_seqlens[1:].long(), torch.arange(26), right=True)
    (per_tok * w.double()[doc]).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6)


def test_masked_loss_trains_only_the_masked_tokens_and_needs_a_mask():
    model, b = _model(), _batch(mask=True)
    out = model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)
    res = MaskedNextTokenLoss()(out, b)
    masked = b.targets.masked_fill(~b.loss_mask, -100)
    want = F.cross_entropy(out.logits().flatten(0, 1), masked.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(res.loss_sum, want.float(), rtol=1e-6, atol=1e-6)
    assert res.count == MaskedNextTokenLoss().count(b) == (masked != -100).sum()
    assert NextTokenLoss().count(b) == (b.targets != -100).sum() > res.count
    with pytest.raises(ValueError, match="needs batches with a loss_mask"):
        MaskedNextTokenLoss()(out, _batch())


class _WithStats(NextTokenLoss):
    def __call__(self, out, b):
        res = super().__call__(out, b)
        return ObjectiveOutput(res.loss_sum, res.count, {"twice": 2 * res.loss_sum.detach()})


def test_local_step_averages_over_the_whole_step_and_reports_stats():
    """The step's loss is the mean over every micro-batch's targets, and its gradient that of the mean."""
    model, batches = _model(torch.float32), [_batch(1), _batch(2)]
    step = LocalModel(model).forward_backward(batches, _WithStats())
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    inputs = torch.cat([b.inputs for b in batches])
    targets = torch.cat([b.targets for b in batches])
    cu = torch.cat([batches[0].cu_seqlens, batches[1].cu_seqlens[1:] + 26])
    ref = model(inputs, targets, cu_seqlens=cu, max_seqlen=12)  # reduction="mean" over both
    ref.backward()
    torch.testing.assert_close(step.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.stats["twice"], 2 * ref.detach(), rtol=1e-5, atol=1e-6)
    assert step.count == sum((b.targets != -100).sum() for b in batches)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)
