"""URL, exact and line-level de-duplication through the pipeline."""

from __future__ import annotations

import numpy as np
from curate_testing import only, read_out, read_removed, write_jsonl

from llama3hp.curate import curate, load_config
from llama3hp.curate.dedup import first_of_groups, normalize_url


def test_normalize_url():
    same = [
        "https://www.Example.com/a/b/?utm_source=x&b=2&a=1#frag",
        "http://example.com:80/a/b?a=1&b=2",
        "example.com/a/b?b=2&a=1",
    ]
    assert len({normalize_url(u) for u in same}) == 1
    assert normalize_url("https://example.com/a/b") != normalize_url("https://example.com/a/c")
    assert normalize_url("https://example.com:8080/") == "example.com:8080/"


def test_first_of_groups_keeps_first_or_longest():
    keys = np.array([7, 3, 7, 7, 3, 9])
    cand = np.array([True, True, True, False, True, True])
    assert first_of_groups(keys, cand).tolist() == [0, 1, 0, 3, 1, 5]
    size = np.array([1, 5, 4, 9, 5, 1])
    assert first_of_groups(keys, cand, size).tolist() == [2, 1, 2, 3, 1, 5]  # ties (5, 5): the first


def test_url_and_exact_duplicates_all_found(tmp_path):
    text = lambda i: f"document number {i} " * 20
    recs = []
    for i in range(30):
        recs.append({"id": f"u{i}", "url": f"https://site.org/page/{i}", "text": text(i)})
        recs.append(
            {"id": f"u{i}-again", "url": f"http://www.site.org/page/{i}/", "text": text(i) + "changed"}
        )
        recs.append({"id": f"x{i}", "text": text(i)})  # no url: an exact copy of u{i}
    recs.append({"id": "nourl", "text": "no url here " * 20})
    path = write_jsonl(tmp_path / "in.jsonl", recs)
    curate([path], tmp_path / "out", only("url", "exact"))
    removed = {r["id"]: r for r in read_removed(tmp_path / "out")}
    assert {i for i, r in removed.items() if r["stage"] == "url"} == {f"u{i}-again" for i in range(30)}
    assert {i for i, r in removed.items() if r["stage"] == "exact"} == {f"x{i}" for i in range(30)}
    assert all(removed[f"x{i}"]["duplicate_of"] == f"u{i}" for i in range(30))
    kept = read_out(tmp_path / "out")
    assert [d["id"] for d in kept] == [f"u{i}" for i in range(30)] + ["nourl"]
    assert kept[0]["url"] == "https://site.org/page/0" and "url" not in kept[-1]

    cfg = only("url")
    cfg.url.keep = "longest"
    curate([path], tmp_path / "longest", cfg)
    assert {r["id"] for r in read_removed(tmp_path / "longest")} == {f"u{i}" for i in range(30)}


def test_line_dedup_removes_exactly_the_lines_over_the_threshold(tmp_path):
    """Within a bucket, a line seen 7 times goes everywhere, one seen 6 times stays; buckets count apart."""
    recs = []
    for i in range(12):
        lines = [f"unique line {i}", "  seen seven times  " if i < 7 else f"other {i}"]
        lines += ["seen six times" if i < 6 else f"more {i}", "", "x" if i < 9 else "y"]
        recs.append({"id": str(i), "text": "\n".join(lines)})
    path = write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = load_config(overrides=["lines.min_chars=2"])
    for stage in ("url", "exact", "minhash", "filters"):
        getattr(cfg, stage).enabled = False
    curate([path], tmp_path / "out", cfg)
    out = {d["id"]: d["text"] for d in read_out(tmp_path / "out")}
    assert out["0"] == "unique line 0\nseen six times\n\nx"  # "x" is shorter than min_chars: never counted
    assert out["8"] == "unique line 8\nother 8\nmore 8\n\nx"
    # Buckets of 6 surviving documents: no line reaches 7 in either, so nothing goes.
    cfg.lines.bucket_docs = 6
    curate([path], tmp_path / "bucketed", cfg)
    assert [d["text"] for d in read_out(tmp_path / "bucketed")] == [r["text"] for r in recs]
