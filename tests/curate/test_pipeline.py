"""The pipeline: same bytes whatever the worker count, resume, prepare reads the output, the report adds up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from curate_testing import edit_words, random_doc, read_out, read_removed, vocabulary, write_jsonl

from llama3hp.curate import CurateConfig, curate, pipeline
from llama3hp.data import TokenDataset, prepare


def mixed_corpus(root: Path) -> list[Path]:
    """Text files and JSONL with every kind of removal: URL, exact and near duplicates, short docs."""
    rng = np.random.default_rng(0)
    vocab = vocabulary(rng, 3000)
    (root / "txt").mkdir(parents=True)
    docs = []
    for _ in range(40):
        words = random_doc(rng, vocab, int(rng.integers(80, 300)))
        lines = [" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
        docs.append("\n".join(lines + ["Copyright notice repeated in every file."]))
    for i, text in enumerate(docs):
        (root / "txt" / f"f{i:02d}.txt").write_text(text)
    (root / "txt" / "zcopy.txt").write_text(docs[3])
    near = edit_words(rng, vocab, docs[5].split(" "), 0.02, 10)
    recs = [{"id": "near5", "text": " ".join(near), "url": "https://a.org/x"}]
    recs += [{"id": "same-url", "text": docs[7] + " tail", "url": "https://www.a.org/x/"}]
    recs += [{"id": f"j{i}", "text": docs[10 + i] + f"\nextra {i}"} for i in range(5)] + [
        {"id": "tiny", "text": "hi"}
    ]
    return [root / "txt", write_jsonl(root / "more.jsonl", recs)]


def small_shards(workers: int) -> CurateConfig:
    cfg = CurateConfig(workers=workers, shard_mb=0.004)  # ~4 KB shards: a dozen of them
    cfg.filters.max_token_kl = 0  # the corpus is random words: every document is an outlier
    return cfg


def test_same_bytes_with_one_and_two_workers_and_prepare_reads_it(tmp_path):
    inputs = mixed_corpus(tmp_path / "in")
    r1 = curate(inputs, tmp_path / "one", small_shards(1))
    r2 = curate(inputs, tmp_path / "two", small_shards(2))
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len([n for n in names if n.startswith("shard_")]) > 5
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert r1 == r2
    removed = {r["id"]: r for r in read_removed(tmp_path / "one")}
    assert removed[str(tmp_path / "in" / "txt" / "zcopy.txt")]["stage"] == "exact"
    assert removed["near5"]["stage"] == "minhash" and removed["near5"]["duplicate_of"].endswith("f05.txt")
    assert removed["same-url"]["stage"] == "exact" or removed["same-url"]["stage"] in ("url", "minhash")
    assert removed["tiny"]["reason"] == "min_words"
    # The copyright line is in 41 documents: line dedup takes it out of every survivor.
    kept = read_out(tmp_path / "one")
    assert kept and not any("Copyright notice" in d["text"] for d in kept)
    # The report adds up: each stage starts where the previous one ended.
    stages = r1["stages"]
    assert stages[0]["documents_in"] == 40 + 1 + 8 and stages[-1]["documents_out"] == len(kept)
    for a, b in zip(stages, stages[1:]):
        assert (a["documents_out"], a["bytes_out"]) == (b["documents_in"], b["bytes_in"])
    assert sum(r["documents"] for r in r1["reasons"]) == len(removed) == 49 - len(kept)
    m = prepare([tmp_path / "one"], tmp_path / "tokens")
    assert m["n_docs"] == len(kept) and TokenDataset(tmp_path / "tokens").n_docs == len(kept)


def test_resume_reuses_finished_shards(tmp_path, monkeypatch):
    inputs = mixed_corpus(tmp_path / "in")
    want = curate(inputs, tmp_path / "ref", small_shards(1))
    clean = pipeline._clean

    def failing(job):
        if job[0] == 3:
            raise RuntimeError("interrupted")
        return clean(job)

    monkeypatch.setattr(pipeline, "_clean", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        curate(inputs, tmp_path / "out", small_shards(1))
    assert not (tmp_path / "out").exists(), "nothing is published before the end"
    work = tmp_path / ".out.curate-work"
    n_shards = len(list((work / "scan").iterdir()))
    assert n_shards > 5 and sorted(p.name for p in (work / "clean").iterdir()) == ["00000", "00001", "00002"]

    monkeypatch.setattr(pipeline, "_clean", clean)
    written = []
    save = pipeline._save_dir
    monkeypatch.setattr(
        pipeline, "_save_dir", lambda t, w: (written.append(f"{t.parent.name}/{t.name}"), save(t, w))
    )
    got = curate(inputs, tmp_path / "out", small_shards(1))
    assert written == [f"clean/{s:05d}" for s in range(3, n_shards)]  # no scan redone, no clean shard twice
    assert got == want and not work.exists()
    for p in (tmp_path / "ref").iterdir():
        assert p.read_bytes() == (tmp_path / "out" / p.name).read_bytes()


def test_cli_curate_prints_the_report(tmp_path, capsys):
    from llama3hp.cli import main

    inputs = mixed_corpus(tmp_path / "in")
    code = main(
        [
            "curate",
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
            *map(str, inputs),
            "filters.max_token_kl=0",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "stage" in out and "minhash" in out and "report.json" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "workers" not in report["config"] and report["config"]["filters"]["max_token_kl"] == 0
