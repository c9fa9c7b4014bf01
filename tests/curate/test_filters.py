"""Each heuristic filter on hand-written documents on both sides of its threshold, and the token KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from curate_testing import only, read_out, read_removed, write_jsonl

from llama3hp.curate import curate
from llama3hp.curate.config import FiltersConfig
from llama3hp.curate.filters import first_failure, kl_divergence, load_word_list, token_histogram

PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. Several members raised "
    "concerns about maintenance costs, while others argued that the new library deserved priority. "
    "After a long discussion they agreed to publish a draft and collect comments from residents "
    "before the final vote in spring."
)


def only_filter(**kw) -> FiltersConfig:
    """Every filter off but the ones given."""
    cfg = FiltersConfig(
        min_words=0, min_mean_line_chars=0, max_mean_line_chars=0, min_alpha_fraction=0,
        max_ellipsis_line_fraction=0, dup_ngram_max_fraction={}, max_token_kl=0,
    )  # fmt: skip
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_defaults_keep_ordinary_prose():
    assert first_failure(PROSE, FiltersConfig(), frozenset()) is None


@pytest.mark.parametrize(
    "cfg, passes, fails, reason",
    [
        (only_filter(min_words=5), "one two three four five", "one two three four", "min_words"),
        (
            only_filter(min_mean_line_chars=10),
            "a line of decent length\nanother one",
            "a\nb\nc\nlonger line",
            "mean_line_chars",
        ),
        (only_filter(max_mean_line_chars=30), "short line\nshort too", "x" * 40, "mean_line_chars"),
        (only_filter(min_alpha_fraction=0.5), "words and 12", "12 34 56 78 ab", "alpha_fraction"),
        (only_filter(min_alpha_fraction=0.5), "naïve café ünïcödé 1", "日本 12345678", "alpha_fraction"),
        (
            only_filter(max_ellipsis_line_fraction=0.3),
            "one...\ntwo\nthree\nfour",
            "one...\ntwo…\nthree\nfour",
            "ellipsis_lines",
        ),
        (
            only_filter(dup_ngram_max_fraction={"5": 0.15}),
            PROSE,
            PROSE + " ERROR: disk full at sector 7 " * 6,
            "dup_5gram",
        ),
    ],
)
def test_filter_both_sides_of_its_threshold(cfg, passes, fails, reason):
    assert first_failure(passes, cfg, frozenset()) is None
    got = first_failure(fails, cfg, frozenset())
    assert got is not None and got[0] == reason, got


def test_dup_ngram_fraction_counts_covered_characters():
    cfg = only_filter(dup_ngram_max_fraction={"2": 0.5})
    # "a b" occurs twice: words 0,1 and 3,4 covered (4 of 6 one-letter words = 0.667).
    assert first_failure("a b c a b d", cfg, frozenset()) == ("dup_2gram", 0.6667)
    assert first_failure("a b c d e f", cfg, frozenset()) is None


def test_word_list_counter(tmp_path):
    listing = tmp_path / "words.txt"
    listing.write_text("darn\nHeck\n")
    words = load_word_list(str(listing))
    cfg = only_filter(words_file=str(listing), max_word_list_fraction=0.1)
    assert first_failure("well, darn it all the way down here", cfg, words) == ("word_list", 0.125)
    assert first_failure("darn! HECK. fine words here", cfg, words) == ("word_list", 0.4)
    assert first_failure("one darn word among many plain ordinary words in a row here", cfg, words) is None


def test_kl_divergence():
    log_q = np.log(np.array([0.5, 0.25, 0.25]))
    u, c = token_histogram(np.array([0, 0, 1, 2]))
    assert kl_divergence(u, c, log_q) == pytest.approx(0.0)
    u, c = token_histogram(np.array([2, 2, 2, 2]))
    assert kl_divergence(u, c, log_q) == pytest.approx(np.log(4))


def test_filters_in_the_pipeline_report_reasons_and_examples(tmp_path):
    """A table of hex bytes has few letters and is full of outlier tokens; 100 prose documents pass.

    Its KL against this corpus is 2.2 nats, the prose's at most 0.15 (a document's KL grows as its
    share of the corpus shrinks, so the threshold here is set for a corpus this small)."""
    table = "\n".join(" ".join(f"0x{(i * 7 + j) % 256:02x}," for j in range(12)) for i in range(8))
    recs = [{"id": f"prose{i}", "text": PROSE.replace("Tuesday", f"day {i}")} for i in range(100)]
    recs += [{"id": "short", "text": "too short"}, {"id": "table", "text": "hex bytes follow\n" + table}]
    cfg = only("filters")
    cfg.filters.dup_ngram_max_fraction = {}
    cfg.filters.max_token_kl = 1.0
    curate([write_jsonl(tmp_path / "in.jsonl", recs)], tmp_path / "out", cfg)
    removed = {r["id"]: r for r in read_removed(tmp_path / "out")}
    assert removed["short"]["reason"] == "min_words" and removed["short"]["value"] == 2
    assert removed["table"]["reason"] == "alpha_fraction"
    assert len(read_out(tmp_path / "out")) == 100
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["examples"]["filters/min_words"][0]["text"] == "too short"
    # With the alpha filter off, the KL filter catches the table.
    cfg.filters.min_alpha_fraction = 0
    curate([write_jsonl(tmp_path / "in.jsonl", recs)], tmp_path / "kl", cfg)
    removed = {r["id"]: r for r in read_removed(tmp_path / "kl")}
    assert removed["table"]["stage"] == "token_kl" and removed["table"]["value"] > cfg.filters.max_token_kl
