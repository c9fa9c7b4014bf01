"""The paper's DPO on one process: the formula, policy = reference, formatting tokens, shared-prompt
packing, and the reference's precomputed values (every layout against one process: the dpo cases of
tests/parallel/test_layouts.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama3hp.data import DataError
from llama3hp.data.examples import build_batch, pair_segments
from llama3hp.model import ModelArgs, Transformer
from llama3hp.parallel import LocalModel
from llama3hp.posttrain.dpo import DPOLoss, dpo_loss, pair_logprobs
from llama3hp.posttrain.reference import (
    CoResidentReference,
    PrecomputedReference,
    ReferenceKey,
    write_values,
)

V = 61


def _model(seed=1):
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16, ffn_dim_multiplier=None,
        max_seq_len=64, rope_scaling=False,
    )  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed=seed)
    return model.double()


def _pairs(shared: bool, seed=0, T=48):
    """Two rows of random pairs, their responses ending in a formatting token (the same pairs either way)."""
    g = np.random.default_rng(seed)
    rows = []
    for r in range(2):
        row = []
        for k in range(2):
            P, C, R = g.integers(3, 7, 3)
            ids = [g.integers(0, V, n) for n in (P, C, R)]
            roles = [np.zeros(P, np.uint8)] + [np.array([1] * (n - 1) + [2], np.uint8) for n in (C, R)]
            row.append(
                (pair_segments(ids[0], roles[0], ids[1], roles[1], ids[2], roles[2], shared), 10 * r + k)
            )
        rows.append(row)
    return build_batch(rows, T, preference=True, shared_prompt=shared, pad_id=0)


def _forward(model, b):
    return model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, doc_prefix=b.doc_prefix)


def test_the_formula_with_the_papers_values():
    pc, pr, rc, rr, n = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.5, 4.0))
    t = dpo_loss(pc, pr, rc, rr, n)  # beta 0.1, alpha 0.2
    margin = 0.1 * ((-10.0 + 11.0) - (-12.0 + 11.5))
    want = -math.log(1 / (1 + math.exp(-margin))) + 0.2 * 10.0 / 4.0
    assert t.loss.item() == pytest.approx(want, rel=1e-12) and t.margin.item() == pytest.approx(margin)


def test_policy_equal_to_reference_gives_ln2_and_zero_margins():
    model, b = _model(), _pairs(shared=True)
    CoResidentReference(LocalModel(model), mask_format_tokens=True).annotate([b])
    stats = LocalModel(model).evaluate([b], DPOLoss(alpha=0.0)).stats
    assert stats["dpo"].item() == pytest.approx(math.log(2), abs=1e-7)  # fp32: the objectives' contract
    assert stats["rewards/margin"].item() == 0.0 and stats["rewards/accuracy"].item() == 0.0
    loss = LocalModel(model).forward_backward([b], DPOLoss(alpha=0.0)).loss
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_shared_prompt_packing_gives_the_separate_sequences_log_probabilities():
    model = _model()
    got = {}
    for shared in (True, False):
        b = _pairs(shared)
        pc, pr, nc, nr = pair_logprobs(_forward(model, b), b, mask_format_tokens=True)
        got[shared] = torch.stack([pc, pr, nc, nr])
    torch.testing.assert_close(got[True], got[False], rtol=1e-10, atol=1e-10)
    # ... and they are what each [prompt response] alone scores.
    b = _pairs(False)
    for (c, r), (pc, pr) in zip(b.pairs.tolist(), got[False][:2].T.tolist()):
        for seg, want in ((c, pc), (r, pr)):
            s, e = b.cu_seqlens[seg].item(), b.cu_seqlens[seg + 1].item()
            logp = F.log_softmax(model(b.inputs.reshape(-1)[s:e][None]).logits().double(), -1)[0]
            t = b.targets.reshape(-1)[s:e]
            keep = (b.loss_mask & ~b.format_mask).reshape(-1)[s:e]
            assert logp[keep, t[keep]].sum().item() == pytest.approx(want, rel=1e-6)  # log-probs are fp32


@pytest.mark.parametrize("shared", [True, False])
def test_formatting_tokens_contribute_exactly_zero(shared):
    """Changing what the formatting tokens' targets are changes nothing, loss or gradient, when they are
    masked (the default); with mask_format_tokens=False it does."""
    model = _model()
    b = _pairs(shared)
    ref = torch.tensor([[-30.0, -31.0]] * b.pairs.shape[0], dtype=torch.float64)
    results = {}
    for mask in (True, False):
        for change in (False, True):
            bb = _pairs(shared)
            bb.ref_logps = ref
            if change:
                bb.targets = torch.where(bb.format_mask, (bb.targets + 7) % V, bb.targets)
            model.zero_grad()
            loss = LocalModel(model).forward_backward([bb], DPOLoss(mask_format_tokens=mask)).loss
            results[mask, change] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert b.format_mask.sum() == 2 * b.pairs.shape[0]
    (l0, g0), (l1, g1) = results[True, False], results[True, True]
    assert l0 == l1 and all(torch.equal(x, y) for x, y in zip(g0, g1))
    assert results[False, False][0] != results[False, True][0]


def test_precomputed_values_are_keyed_and_checked(tmp_path):
    model, b = _model(), _pairs(shared=True)
    CoResidentReference(LocalModel(model), mask_format_tokens=True).annotate([b])
    key = ReferenceKey("t" * 64, "c" * 64, "d" * 64)
    values = {int(i): tuple(v) for i, v in zip(b.pair_ids.tolist(), b.ref_logps.tolist())}
    path = tmp_path / "ref.json"
    write_values(path, key, values)
    table = PrecomputedReference(path, key)
    torch.testing.assert_close(table.lookup(b.pair_ids), b.ref_logps.float())
    for other in (ReferenceKey("x" * 64, "c" * 64, "d" * 64), ReferenceKey("t" * 64, "x" * 64, "d" * 64),
                  ReferenceKey("t" * 64, "c" * 64, "x" * 64)):  # fmt: skip
        with pytest.raises(DataError, match="computed for another") as e:
            PrecomputedReference(path, other)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="lack some pairs"):
        table.lookup(torch.tensor([99]))
