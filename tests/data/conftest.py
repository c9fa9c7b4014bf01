"""Fixtures for the data-pipeline tests: the real tokenizer and synthetic token datasets.

Synthetic datasets use token ids that are unique across the dataset (document k holds consecutive
ids), so every (input, target) pair a loader yields can be traced back to its place in the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_testing import FAKE_SHA  # noqa: E402

from llama3hp.data import Tokenizer, write_token_dataset


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.load()


def make_docs(n_docs: int, seed: int, first_id: int = 1, max_len: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len, size=n_docs)
    docs, nxt = [], first_id
    for n in lens:
        docs.append(np.arange(nxt, nxt + n, dtype=np.int64))
        nxt += int(n)
    return docs


@pytest.fixture
def synth(tmp_path: Path):
    """Factory: synth(name, n_docs, seed, first_id) -> (path, docs) of a written synthetic dataset."""

    def make(name: str = "ds", n_docs: int = 60, seed: int = 0, first_id: int = 1, **kw):
        docs = make_docs(n_docs, seed, first_id, **kw)
        path = tmp_path / name
        write_token_dataset(docs, path, tokenizer_sha256=FAKE_SHA, vocab_size=1 << 20, shard_tokens=300)
        return path, docs

    return make
