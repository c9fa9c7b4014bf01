"""Bad input gets one-line DataErrors naming the problem and the fix; the CLI prints one line, exit 2."""

from __future__ import annotations

import os

import pytest
from curate_testing import write_jsonl

from llama3hp.curate import CurateConfig, curate, load_config
from llama3hp.data import DataError


def one_line(fn, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn()
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_unreadable_and_undecodable_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.txt").write_text("fine")
    os.symlink(tmp_path / "gone.txt", d / "dangling.txt")
    one_line(lambda: curate([d], tmp_path / "out"), r"cannot read input file .*dangling\.txt")
    (d / "dangling.txt").unlink()
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    one_line(lambda: curate([d], tmp_path / "out"), r"latin1\.txt is not valid UTF-8 \(byte 3\)")
    one_line(lambda: curate([tmp_path / "nope"], tmp_path / "out"), "does not exist")


def test_jsonl_without_a_text_field_or_not_json(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    one_line(lambda: curate([p], tmp_path / "out"), r"a\.jsonl line 2 has no 'text' field; set text_field")
    p.write_text('{"text": "fine"}\n{not json\n')
    one_line(lambda: curate([p], tmp_path / "out"), r"a\.jsonl line 2 is not valid JSON")
    p.write_text('{"text": "fine", "url": 7}\n')
    one_line(lambda: curate([p], tmp_path / "out"), r"field 'url' is int, not a string")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line(lambda: curate([tmp_path / "empty"], tmp_path / "out"), "empty input: no files")
    (tmp_path / "empty" / "none.jsonl").write_text("")
    one_line(lambda: curate([tmp_path / "empty"], tmp_path / "out"), "empty input: 1 input file")


def test_config_errors(tmp_path):
    msg = one_line(lambda: load_config(overrides=["minhash.treshold=0.7"]), "unknown key 'minhash.treshold'")
    assert msg.endswith("did you mean minhash.threshold?")
    one_line(
        lambda: load_config(overrides=["minhash.bands=many"]), r"minhash.bands='many' is not a valid int"
    )
    one_line(
        lambda: load_config(overrides=["minhash.bands=2.5"]), r"minhash.bands must be of type int, got 2.5"
    )
    one_line(lambda: load_config(overrides=["minhash.threshold=1.5"]), r"threshold must be in \(0, 1\]")
    one_line(lambda: load_config(overrides=["url.keep=last"]), "url.keep must be 'first' or 'longest'")
    one_line(lambda: load_config(overrides=["nonsense"]), "is not key=value")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[filters]\nmin_wrds = 10\n")
    one_line(lambda: load_config(cfg), "unknown key 'filters.min_wrds'; did you mean filters.min_words?")
    cfg.write_text("[filters\n")
    one_line(lambda: load_config(cfg), "is not valid TOML")
    one_line(lambda: load_config(tmp_path / "missing.toml"), "does not exist")
    one_line(
        lambda: load_config(overrides=["filters.words_file=nowhere.txt"]),
        "words_file nowhere.txt does not exist",
    )
    cfg.write_text(
        'workers = 1\n[minhash]\nthreshold = 0.7\n[filters]\ndup_ngram_max_fraction = {"5" = 0.2}\n'
    )
    got = load_config(cfg, ["lines.enabled=false"])
    assert (got.workers, got.minhash.threshold, got.lines.enabled) == (1, 0.7, False)
    assert got.filters.dup_ngram_max_fraction == {"5": 0.2}


def test_output_folder_must_be_new_or_overwritten(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "some words " * 30}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    one_line(
        lambda: curate([p], tmp_path / "out", CurateConfig(workers=1)), "already exists and is not empty"
    )
    curate([p], tmp_path / "out", CurateConfig(workers=1), overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "report.json").is_file()


def test_cli_one_line_and_exit_2(tmp_path, capsys):
    from llama3hp.cli import main

    assert main(["curate", "--out", str(tmp_path / "out"), str(tmp_path), "minhash.rows=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: curate config: minhash.n_gram, bands and rows must be >= 1"]
