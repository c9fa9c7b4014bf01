"""The reward model on one process: the Bradley-Terry formula, rankings expanded to ordered pairs,
scores of shared-prompt packed rows equal to each response scored alone, the objective's sums and
stats, and the head's place in the model (every layout against one process: the reward cases of
tests/parallel/test_layouts.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama3hp.data.examples import build_batch, response_segments
from llama3hp.model import ModelArgs, RewardHead, Transformer
from llama3hp.posttrain.reward import RewardLoss, bradley_terry_loss, response_scores

V = 61


def _model(seed=1):
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16, ffn_dim_multiplier=None,
        max_seq_len=64, rope_scaling=False, head="reward",
    )  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed=seed)
    return model.double()


def _ranking(g, k):
    """A random prompt and k responses (ids, roles), each response ending in a formatting token."""
    P = int(g.integers(3, 7))
    prompt = (g.integers(0, V, P), np.zeros(P, np.uint8))
    responses = []
    for n in g.integers(2, 6, k):
        responses.append((g.integers(0, V, n), np.array([1] * (n - 1) + [2], np.uint8)))
    return prompt, responses


def _rows(shared: bool, seed=0, T=48):
    """Two rows: a ranking of 3 responses (edited > chosen > rejected) and pairs of 2."""
    g = np.random.default_rng(seed)
    rows, examples = [], []
    for r in range(2):
        row = []
        for k in (3, 2) if r == 0 else (2,):
            (p_ids, p_roles), responses = _ranking(g, k)
            examples.append((p_ids, [ids for ids, _ in responses]))
            row.append((response_segments(p_ids, p_roles, responses, shared), 10 * r + k))
        rows.append(row)
    return build_batch(rows, T, preference=True, shared_prompt=shared, pad_id=0), examples


def _forward(model, b):
    return model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, doc_prefix=b.doc_prefix)


def test_bradley_terry_formula():
    better, worse = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 1.5, 0.0])
    want = [math.log1p(math.exp(-d)) for d in (1.0, -2.5, 0.0)]
    assert torch.allclose(bradley_terry_loss(better, worse), torch.tensor(want))
    assert abs(bradley_terry_loss(torch.zeros(1), torch.zeros(1)).item() - math.log(2)) < 1e-7  # no margin


@pytest.mark.parametrize("shared", [True, False])
def test_a_ranking_expands_to_every_ordered_pair(shared):
    b, _ = _rows(shared)
    assert b.pairs is not None and b.pair_ids is not None
    # Row 0: a ranking of 3 (3 pairs) then a pair; row 1: a pair. Segment numbers: shared prompt
    # [p | e | c | r][p | c | r] (+ padding), separate [pe | pc | pr][pc | pr].
    if shared:
        want = [(1, 2), (1, 3), (2, 3), (5, 6), (9, 10)]
    else:
        want = [(0, 1), (0, 2), (1, 2), (3, 4), (6, 7)]
    assert [tuple(p) for p in b.pairs.tolist()] == want
    assert b.pair_ids.tolist() == [3, 3, 3, 2, 12]


@pytest.mark.parametrize("shared", [True, False])
def test_packed_scores_equal_each_response_scored_alone(shared):
    model = _model()
    b, examples = _rows(shared)
    with torch.no_grad():
        scores = response_scores(_forward(model, b), b)
        alone = []
        for p_ids, responses in examples:
            for ids in responses:
                x = torch.from_numpy(np.concatenate([p_ids, ids]))[None]
                alone.append(model(x).scores()[-1].item())  # the response's last token
    assert b.pairs is not None
    got = scores[torch.unique(b.pairs)].tolist()  # the responses' segments, in order
    assert np.allclose(got, alone, rtol=0, atol=1e-9), (got, alone)


def test_objective_sums_pairs_and_reports_accuracy_and_scores():
    model = _model()
    b, _ = _rows(True)
    out = RewardLoss()(_forward(model, b), b)
    assert b.pairs is not None
    s = response_scores(_forward(model, b), b).detach()
    better, worse = s[b.pairs[:, 0]], s[b.pairs[:, 1]]
    want = -F.logsigmoid(better - worse)
    assert torch.allclose(out.loss_sum, want.sum()) and out.count.item() == 5
    assert out.stats["accuracy"].item() == (better > worse).sum().item()
    assert torch.allclose(out.stats["rewards/chosen"], better.sum())
    assert torch.allclose(out.stats["rewards/rejected"], worse.sum())
    out.loss_sum.backward()
    assert model.output.score.grad is not None and model.output.score.grad.abs().sum() > 0


def test_reward_model_has_a_scalar_head_and_no_logits():
    model = _model()
    assert isinstance(model.output, RewardHead) and tuple(model.output.score.shape) == (1, 32)
    assert "output.weight" not in dict(model.named_parameters())
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert out.scores().shape == (4,)
    with pytest.raises(ValueError, match="scalar head"):
        out.logits()


def test_prepare_drops_near_identical_responses_and_the_loader_reads_rankings(tmp_path):
    import json

    from llama3hp.data import prepare
    from llama3hp.data.examples import ExampleLoader
    from llama3hp.data.shards import TokenDataset

    long = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
    rows = [
        {"prompt": "a", "chosen": "Hello there!", "rejected": "Go away.", "edited": "Hello!"},
        {"prompt": "b", "chosen": long, "rejected": long + " Yes."},  # near-identical: dropped
        {"prompt": "c", "chosen": "same", "rejected": "same"},  # identical: dropped
        {"prompt": "d", "chosen": "Blue", "rejected": "A number", "edited": "Blue "},  # edited = chosen
    ]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare([src], tmp_path / "out", format="preference", workers=1, max_similarity=0.9)
    assert m["n_docs"] == 2 and m["similar_dropped"] == {"pairs": 2, "edited": 1}
    assert m["settings"]["max_similarity"] == 0.9
    ds = TokenDataset(tmp_path / "out")
    b = ExampleLoader([ds], ranked=True).epoch_batches(1, 128)[0]
    assert b.pairs is not None and b.pairs.shape[0] == 3 + 1  # a ranking of 3, then a pair
    b = ExampleLoader([ds]).epoch_batches(1, 128)[0]  # DPO's reading: (chosen, rejected) only
    assert b.pairs is not None and b.pairs.shape[0] == 2


def test_scorer_scores_packed_prompts_as_each_text_alone():
    from llama3hp.data.tokenizer import Tokenizer
    from llama3hp.inference.scoring import RewardScorer

    model = _model().float()
    model.args.vocab_size = V
    tok = Tokenizer.load()

    class SmallVocab:  # the tokenizer's ids folded into the small model's vocabulary
        eot_id = 7
        bos_id = 1
        start_header_id, end_header_id = 2, 3

        def encode(self, text):
            return [t % V for t in tok.encode(text)]

    scorer = RewardScorer(model, SmallVocab(), max_batch_tokens=40)  # type: ignore[arg-type]
    groups = [("Say hi", ["Hello!", "Go away.", ""]), ("2+2?", ["4"]), ("Name a colour", ["Blue", "Red"])]
    packed = scorer.score(groups, system="Be brief.")
    for (prompt, responses), got in zip(groups, packed):
        for r, s in zip(responses, got):
            p_ids, (r_ids,) = scorer.encode(prompt, [r], system="Be brief.")
            with torch.no_grad():
                alone = model(torch.tensor([p_ids + r_ids])).scores()[-1].item()
            assert abs(s - alone) < 1e-5, (prompt, r, s, alone)
