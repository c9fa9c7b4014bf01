"""prepare(): text files + JSONL -> shards that decode back to the documents; determinism; loader on top."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llama3hp.data import DataConfig, TokenDataset, Tokenizer, build_loader, default_corpus_files, prepare


def make_corpus(root: Path) -> list[str]:
    """A small corpus; returns the expected document texts in prepare's order."""
    (root / "sub" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "a.txt": "Plain text file.\nSecond line with ünïcödé and 🙂.\n",
        "b.py": "def add(a, b):\n    return a + b\n" * 20,
        "empty.md": "",
        "sub/c.md": "# Title\n\nSome *markdown* text.\n",
        "sub/deep/d.rst": "Section\n=======\n\nBody of the reStructuredText file. " * 30,
        "sub/ignored.bin": "not selected by extension",
        ".hidden/e.txt": "hidden files are skipped",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    lines = [
        {"text": "First JSONL document."},
        {"text": 'Second one, with "quotes" and\nnewlines.'},
        {"text": ""},
    ]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    # Directories are walked in sorted path order, .jsonl files included.
    jsonl = [x["text"] for x in lines if x["text"]]
    return [files["a.txt"], files["b.py"], *jsonl, files["sub/c.md"], files["sub/deep/d.rst"]]


def test_prepare_round_trips_documents(tmp_path, tok: Tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = make_corpus(corpus)
    m = prepare([corpus], tmp_path / "out", shard_tokens=64)
    assert m["n_docs"] == len(expected) and m["skipped_empty_docs"] == 2
    assert (
        len(m["shards"]) > 1
        and m["tokenizer"]["sha256"] == tok.sha256
        and m["tokenizer"]["vocab_size"] == 128_256
    )
    assert [Path(i["path"]).name for i in m["inputs"]] == [
        "a.txt",
        "b.py",
        "docs.jsonl",
        "empty.md",
        "c.md",
        "d.rst",
    ]
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    ds = TokenDataset(tmp_path / "out", tokenizer_sha256=tok.sha256, verify=True)
    assert ds.n_docs == len(expected) and ds.n_tokens == m["n_tokens"]
    for d, text in enumerate(expected):
        ids = ds.doc_tokens(d).tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == text
    raw = np.fromfile(tmp_path / "out" / "shard_00000.bin", dtype="<u4")
    assert raw.size == m["shards"][0]["n_tokens"] and raw[0] == tok.bos_id
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory renamed away"


def test_prepare_is_deterministic_across_runs_and_workers(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_corpus(corpus)
    prepare([corpus], tmp_path / "one", workers=1, shard_tokens=100)
    prepare([corpus], tmp_path / "two", workers=2, shard_tokens=100)
    prepare([corpus], tmp_path / "two", workers=2, shard_tokens=100, overwrite=True)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_loader_on_prepared_data_covers_epoch(tmp_path, tok: Tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_corpus(corpus)
    prepare([corpus], tmp_path / "ds", shard_tokens=50)
    ds = TokenDataset(tmp_path / "ds")
    stream_counts = Counter(np.concatenate([ds.doc_tokens(d) for d in range(ds.n_docs)]).tolist())
    T = 24
    n0 = (ds.n_tokens - 1) // T
    for dp_size in (1, 2, 3):
        loaders = [
            build_loader(DataConfig(datasets=[str(tmp_path / "ds")]), dp_rank=r, dp_size=dp_size)
            for r in range(dp_size)
        ]
        targets: Counter = Counter()
        rows_seen = 0
        while rows_seen + dp_size <= n0:
            for ld in loaders:
                targets.update(ld.next_batch(1, T).targets.reshape(-1).tolist())
            rows_seen += dp_size
        # Within the first epoch no token is a target more often than it occurs in the data.
        assert all(targets[t] <= stream_counts[t] for t in targets)
        assert sum(targets.values()) == rows_seen * T


@pytest.mark.slow
def test_default_corpus_prepares_quickly(tmp_path):
    files = default_corpus_files()
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in f.parts for f in files)
    m = prepare(files, tmp_path / "stdlib", workers=2)
    assert m["n_docs"] + m["skipped_empty_docs"] == len(files) and m["n_tokens"] > 1_000_000
