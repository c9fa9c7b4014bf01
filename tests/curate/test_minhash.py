"""MinHash: C++ and numpy agree; planted near-duplicates are found and unrelated documents never merged."""

from __future__ import annotations

import numpy as np
import pytest
from curate_testing import edit_words, only, random_doc, read_removed, vocabulary, write_jsonl

import llama3hp
from llama3hp.curate import curate, minhash

needs_cpp = pytest.mark.skipif(not llama3hp.has_cpp_ext(), reason="llama3hp._C not built")


@needs_cpp
def test_cpp_signatures_equal_numpy():
    rng = np.random.default_rng(0)
    pieces = [
        "Hello",
        "WORLD",
        "x86_64",
        "42",
        "3.14",
        "naïve",
        "日本語",
        "--",
        "\n",
        "  ",
        "a_b",
        "ZZ9",
        "0007",
    ]
    texts = [" ".join(rng.choice(pieces, size=int(rng.integers(0, 40)))).encode() for _ in range(60)]
    texts += [b"", b"one two", b"1 2 3 4 5 6", "ÀÉÎ õü ß".encode()]
    for n_gram in (1, 3, 5):
        a, b = minhash.permutations(24, seed=n_gram)
        got = minhash.signatures(texts, n_gram, a, b)
        want = minhash.signatures_numpy(texts, n_gram, a, b)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), n_gram
        empty = want[1] == 0
        assert (want[0][empty] == 0xFFFFFFFF).all() and (want[0][~empty] != 0xFFFFFFFF).any()


def test_normalisation_folds_case_digits_and_punctuation():
    assert np.array_equal(minhash.word_hashes(b"Page 12, line 7!"), minhash.word_hashes(b"page 3 LINE 99"))
    assert minhash.word_hashes(b"snake_case-words").size == 3


def test_merge_runs_in_small_blocks_equals_one_sort():
    rng = np.random.default_rng(1)
    runs, all_k, all_v = [], [], []
    for s in range(5):
        k = np.sort(rng.integers(0, 40, size=int(rng.integers(0, 60))).astype(np.uint64))
        v = np.arange(k.size, dtype=np.int32)
        runs.append((k, v, 1000 * s))
        all_k.append(k)
        all_v.append(v.astype(np.int64) + 1000 * s)
    keys, vals = np.concatenate(all_k), np.concatenate(all_v)
    for block in (1, 3, 7, 1000):
        got = [g for g in minhash.merge_runs(runs, block) if g[0].size]
        # Blocks come in key order (each block's keys <= the next block's), unsorted inside.
        assert all(a[0].max() <= b[0].min() for a, b in zip(got, got[1:])), block
        assert np.array_equal(np.concatenate([np.sort(g[0]) for g in got]), np.sort(keys)), block
        assert sorted(np.concatenate([g[1] for g in got]).tolist()) == sorted(vals.tolist())
    # Candidate pairs do not depend on the block size, even when a key's entries span blocks.
    alive = np.ones(5000, dtype=bool)
    want = minhash._band_candidates(runs, alive, 1000)
    for block in (1, 2, 5):
        assert np.array_equal(
            np.unique(minhash._band_candidates(runs, alive, block), axis=0), np.unique(want, axis=0)
        )


def test_connected_components_label_is_the_smallest_member():
    pairs = np.array([[5, 3], [3, 9], [9, 1], [7, 8]])
    label = minhash.connected_components(pairs, 10)
    assert label.tolist() == [0, 1, 2, 1, 4, 1, 6, 7, 7, 1]


def _planted(tmp_path, rng, n: int, run: int, cfg):
    vocab = vocabulary(rng)
    base = [random_doc(rng, vocab, int(rng.integers(200, 600))) for _ in range(n)]
    recs = [{"id": f"orig{i}", "text": " ".join(d)} for i, d in enumerate(base)]
    recs += [
        {"id": f"edit{i}", "text": " ".join(edit_words(rng, vocab, d, 0.05, run))} for i, d in enumerate(base)
    ]
    path = write_jsonl(tmp_path / "planted.jsonl", recs)
    curate([path], tmp_path / "out", cfg)
    removed = read_removed(tmp_path / "out")
    found = [r for r in removed if r["id"] == "edit" + r.get("duplicate_of", "")[4:]]
    return len(found) / n, len(removed) - len(found)


def test_planted_near_duplicates_found_at_default_settings(tmp_path):
    """5% of each copy's words replaced, a sentence (10 words) at a time: recall >= 0.95, nothing else merged.

    Jaccard of word 5-grams is then about 0.87. Scattered single-word edits at 5% leave about
    0.63 (each edit breaks 5 shingles), below the default threshold of 0.8: see the next test.
    """
    recall, wrong = _planted(tmp_path, np.random.default_rng(2), 200, 10, only("minhash"))
    assert recall >= 0.95 and wrong == 0, (recall, wrong)


def test_scattered_edits_found_with_a_lower_threshold(tmp_path):
    cfg = only("minhash")
    cfg.minhash.threshold, cfg.minhash.bands, cfg.minhash.rows = 0.5, 25, 4
    recall, wrong = _planted(tmp_path, np.random.default_rng(3), 200, 1, cfg)
    assert recall >= 0.95 and wrong == 0, (recall, wrong)


def test_unrelated_documents_are_never_merged(tmp_path):
    """Precision: 2,000 random documents over a 500-word vocabulary, all opening with the same
    30-word header: common words and a common paragraph, but no near-duplicates; none is removed."""
    rng = np.random.default_rng(4)
    vocab = vocabulary(rng, 500)
    header = " ".join(random_doc(rng, vocab, 30))
    recs = [{"id": str(i), "text": header + " " + " ".join(random_doc(rng, vocab, 300))} for i in range(2000)]
    curate([write_jsonl(tmp_path / "u.jsonl", recs)], tmp_path / "out", only("minhash"))
    assert read_removed(tmp_path / "out") == []


def test_token_shingles_find_the_same_planted_copy(tmp_path):
    """minhash.shingle=token: Llama 3 token 5-grams instead of words (the numpy path)."""
    rng = np.random.default_rng(5)
    vocab = vocabulary(rng, 2000)
    base = [random_doc(rng, vocab, 300) for _ in range(20)]
    recs = [{"id": f"orig{i}", "text": " ".join(d)} for i, d in enumerate(base)]
    recs.append({"id": "edit3", "text": " ".join(edit_words(rng, vocab, base[3], 0.02, 6))})
    cfg = only("minhash")
    cfg.minhash.shingle = "token"
    curate([write_jsonl(tmp_path / "t.jsonl", recs)], tmp_path / "out", cfg)
    assert [(r["id"], r["duplicate_of"]) for r in read_removed(tmp_path / "out")] == [("edit3", "orig3")]
