"""Corpus builders shared by the curation tests (a uniquely named module, like tests/data/data_testing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama3hp.curate import CurateConfig

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def vocabulary(rng: np.random.Generator, n: int = 20_000) -> list[str]:
    return ["".join(rng.choice(LETTERS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def random_doc(rng: np.random.Generator, vocab: list[str], n_words: int) -> list[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), n_words)]


def edit_words(
    rng: np.random.Generator, vocab: list[str], words: list[str], frac: float, run: int
) -> list[str]:
    """`words` with round(frac * len) words replaced, in runs of `run` consecutive words."""
    out = list(words)
    todo = max(1, round(frac * len(out)))
    while todo > 0:
        n = min(run, todo)
        start = int(rng.integers(0, len(out) - n))
        for i in range(start, start + n):
            out[i] = vocab[int(rng.integers(len(vocab)))]
        todo -= n
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_out(out: Path) -> list[dict]:
    return [
        json.loads(line) for p in sorted(out.glob("shard_*.jsonl")) for line in p.read_text().splitlines()
    ]


def read_removed(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "removed.ndjson").read_text().splitlines()]


def only(*stages: str, **kw) -> CurateConfig:
    """A config with just the named stages on (e.g. only("minhash"))."""
    cfg = CurateConfig(workers=kw.pop("workers", 1), **kw)
    cfg.url.enabled = "url" in stages
    cfg.exact.enabled = "exact" in stages
    cfg.minhash.enabled = "minhash" in stages
    cfg.lines.enabled = "lines" in stages
    cfg.filters.enabled = "filters" in stages
    return cfg
