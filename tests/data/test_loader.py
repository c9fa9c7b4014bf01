"""Packed loader: coverage per epoch, pair/segment correctness, DP slices, resume, seq_len changes, blend."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from data_testing import FAKE_SHA

from llama3hp.data import Batch, DataConfig, build_loader
from llama3hp.model.rope import document_positions


class Truth:
    """Where each synthetic token id sits: document offset and length (ids are unique, from first_id)."""

    def __init__(self, docs: list[np.ndarray]):
        top = int(max(d[-1] for d in docs)) + 1
        self.off = np.full(top, -1, np.int64)
        self.len = np.zeros(top, np.int64)
        for d in docs:
            self.off[d] = np.arange(d.size)
            self.len[d] = d.size
        self.n_tokens = sum(d.size for d in docs)

    def check(self, batch: Batch) -> list[int]:
        """Assert every pair and segment of `batch` is right; return its target ids."""
        inp, tgt = batch.inputs.numpy(), batch.targets.numpy()
        B, T = inp.shape
        cu = batch.cu_seqlens.numpy().astype(np.int64)
        assert cu[0] == 0 and cu[-1] == B * T and np.all(np.diff(cu) > 0)
        assert set(range(0, B * T, T)) <= set(cu.tolist()), "every row starts a segment"
        assert batch.max_seqlen == int(np.diff(cu).max())
        starts = set(cu.tolist())
        for b in range(B):
            for t in range(T):
                v, w = inp[b, t], tgt[b, t]
                assert self.off[v] >= 0 and self.off[w] >= 0, "unknown token"
                if self.off[v] < self.len[v] - 1:
                    assert w == v + 1, "target is the next token of the document"
                else:
                    assert self.off[w] == 0, "after a document's last token comes a document start"
                if t > 0:
                    contiguous = inp[b, t] == inp[b, t - 1] + 1 and self.off[v] != 0
                    assert (b * T + t in starts) == (not contiguous), "segments follow documents and pieces"
        # The loader leaves positions to the model (None: they restart at every segment start).
        assert batch.positions is None
        pos = document_positions(batch.cu_seqlens, B, T, "cpu").numpy()
        for s, e in zip(cu[:-1], cu[1:]):
            assert np.array_equal(pos.reshape(-1)[s:e], np.arange(e - s))
        return tgt.reshape(-1).tolist()


def _loader(paths, seed=0, **kw):
    return build_loader(
        DataConfig(datasets=[str(p) for p in paths], seed=seed), tokenizer_sha256=FAKE_SHA, **kw
    )


def test_first_epoch_targets_every_token_once(synth):
    path, docs = synth(n_docs=80, seed=1)
    truth, T = Truth(docs), 16
    loader = _loader([path])
    n0 = (truth.n_tokens - 1) // T
    targets: list[int] = []
    for rows in (3, 1, 5):  # batch ramp inside the epoch
        targets += truth.check(loader.next_batch(rows, T))
    while len(targets) < n0 * T:
        targets += truth.check(loader.next_batch(1, T))
    assert len(targets) == n0 * T == len(set(targets)), "no token is a target twice within an epoch"
    never = truth.n_tokens - len(targets)
    assert never == (truth.n_tokens - 1) % T + 1, "only the stream's first token and the carried tail"
    # Two rounds: every token a target twice, except two epoch-first tokens and the carried tail.
    n1 = (truth.n_tokens - 1 + (truth.n_tokens - 1) % T) // T
    for _ in range(n1):
        targets += truth.check(loader.next_batch(1, T))
    counts = Counter(targets)
    assert set(counts.values()) <= {1, 2} and len(counts) == truth.n_tokens
    ones = sum(1 for c in counts.values() if c == 1)
    leftover = (truth.n_tokens - 1 + (truth.n_tokens - 1) % T) % T
    assert ones == 2 + leftover


@pytest.mark.parametrize("dp_size", [2, 3])
def test_data_parallel_slices_are_disjoint_and_complete(synth, dp_size):
    path, docs = synth(n_docs=50, seed=2)
    single = _loader([path])
    ranks = [_loader([path], dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for rows, T in [(2, 8), (1, 8), (3, 12)]:
        whole = single.next_batch(rows * dp_size, T)
        parts = [rk.next_batch(rows, T) for rk in ranks]
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)


def test_resume_reproduces_the_continuation(synth):
    (p1, _), (p2, _) = synth("a", 40, 3), synth("b", 30, 4, first_id=10_000)
    plan = [(2, 8), (3, 8), (1, 12), (2, 12), (2, 5), (4, 5), (1, 9), (2, 9), (3, 9)]
    ref = _loader([f"{p1}:0.7", f"{p2}:0.3"], seed=5)
    ref_batches = [ref.next_batch(r, t) for r, t in plan]
    for cut in (0, 1, 3, 5):
        run = _loader([f"{p1}:0.7", f"{p2}:0.3"], seed=5)
        for r, t in plan[:cut]:
            run.next_batch(r, t)
        sd = json.loads(json.dumps(run.state_dict()))
        resumed = _loader([f"{p1}:0.7", f"{p2}:0.3"], seed=5)
        resumed.load_state_dict(sd)
        for (r, t), want in zip(plan[cut:], ref_batches[cut:]):
            got = resumed.next_batch(r, t)
            assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
            assert torch.equal(got.cu_seqlens, want.cu_seqlens)


def test_seq_len_change_neither_repeats_nor_skips(synth):
    path, docs = synth(n_docs=70, seed=6)
    truth = Truth(docs)
    loader = _loader([path], seed=1)
    cursor = loader.cursors[0]
    targets: list[int] = []
    for _ in range(9):
        targets += truth.check(loader.next_batch(2, 7))
    # Staged context: 7 -> 11 -> 5, each switch re-cuts what is left of epoch 0.
    for T, rows in ((11, 4), (5, None)):
        targets += truth.check(loader.next_batch(1, T))
        left = cursor.round.n_samples - cursor.served if rows is None else rows
        for _ in range(left):
            targets += truth.check(loader.next_batch(1, T))
    rnd = cursor.round
    assert cursor.served == rnd.n_samples and cursor.next_epoch == 1, "still inside epoch 0"
    assert len(targets) == len(set(targets)), "no token targeted twice"
    leftover = rnd.n_pairs - rnd.n_samples * 5
    assert len(targets) + leftover == truth.n_tokens - 1, "every epoch-0 pair served or carried"
    for _ in range(4):  # the next round (epoch 1 + carried pairs) still yields valid rows
        truth.check(loader.next_batch(3, 5))


def test_blend_proportions_match_weights(synth):
    weights = [0.50, 0.25, 0.17, 0.08]
    paths = [synth(f"d{i}", 20 + 10 * i, 10 + i, first_id=100_000 * (i + 1))[0] for i in range(4)]
    loader = _loader([f"{p}:{w}" for p, w in zip(paths, weights)])
    seen = []
    for _ in range(25):
        b = loader.next_batch(4, 6)
        seen += (b.inputs[:, 0] // 100_000 - 1).tolist()
    n = len(seen)
    counts = np.bincount(seen, minlength=4)
    assert np.all(np.abs(counts - np.array(weights) * n) <= 1), counts
    # Small datasets repeat epochs; every prefix stays within one sample of its target share.
    running = np.zeros(4)
    for j, d in enumerate(seen, start=1):
        running[d] += 1
        assert np.all(np.abs(running - np.array(weights) * j) < 1.0 + 1e-9)


def test_default_weights_follow_token_counts(synth):
    (p1, d1), (p2, d2) = synth("a", 60, 1), synth("b", 20, 2, first_id=100_000)
    loader = _loader([p1, p2])
    n1, n2 = sum(len(x) for x in d1), sum(len(x) for x in d2)
    assert np.allclose(loader.weights, [n1 / (n1 + n2), n2 / (n1 + n2)])


def test_shuffle_depends_on_seed_and_is_deterministic(synth):
    path, _ = synth(n_docs=40, seed=7)
    a, b, c = _loader([path], seed=1), _loader([path], seed=1), _loader([path], seed=2)
    ba, bb, bc = a.next_batch(4, 10), b.next_batch(4, 10), c.next_batch(4, 10)
    assert torch.equal(ba.inputs, bb.inputs)
    assert not torch.equal(ba.inputs, bc.inputs)


def test_batch_to_device_and_dtypes(synth):
    path, _ = synth(n_docs=20, seed=8)
    b = _loader([path]).next_batch(2, 8).to("cpu")
    assert b.inputs.dtype == torch.int64 and b.targets.dtype == torch.int64
    assert b.cu_seqlens.dtype == torch.int32 and b.inputs.shape == (2, 8) and b.n_tokens == 16
