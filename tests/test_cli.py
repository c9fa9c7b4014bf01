"""The command line: every user error is one line on stderr and exit code 2; a bug keeps its
traceback and exits with code 1."""

import json

import pytest
import torch

from llama3hp.cli import main
from llama3hp.train import checkpoint as ckpt


def _one_line_error(capsys, argv, contains):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert contains in lines[0], lines[0]


@pytest.fixture
def weights_ckpt(tmp_path):
    """A weights-only checkpoint of a 1-layer, dim-64 model (as `llama3hp import` writes)."""
    import dataclasses

    from llama3hp.model import Transformer, get_model_args

    args = dataclasses.replace(
        get_model_args("tiny"), dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512
    )
    model = Transformer(args)
    model.init_weights(0)
    return ckpt.save_checkpoint(
        tmp_path / "ck",
        7,
        model_state=model.state_dict(),
        optim_state=None,
        train_state={"model_args": dataclasses.asdict(args)},
    )


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["train", "--help"], ["average", "--help"], ["import", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, contains",
    [
        (["train", "--config", "tiny", "traning.lr=1"], "did you mean 'training.lr'?"),
        (["train", "--config", "tiny", "training.steps=ten"], "expected int"),
        (["train", "--config", "/nonexistent/job.toml"], "config file not found"),
        (["train", "--config", "tiny", "model.preset=llama9"], "unknown model preset"),
        (["train", "--config", "tiny", "training.global_batch_rows=3"], "not divisible"),
        (["train", "--config", "tiny", "training.warmup_steps=99999"], "warmup_steps"),
        (["train"], "--config"),
        (["info", "llama9"], "unknown model preset"),
        (["info", "tiny", "--seq-len", "x"], "invalid int value"),
        (
            ["export", "--checkpoint", "/nonexistent/ck", "--format", "hf", "--out", "/tmp/x"],
            "checkpoint not found",
        ),
        (["export", "--checkpoint", "/tmp", "--format", "onnx", "--out", "/tmp/x"], "invalid choice"),
        (
            ["import", "--format", "hf", "--src", "/nonexistent/src", "--out", "/tmp/x"],
            "source folder not found",
        ),
        (["average", "/nonexistent/ck", "--out", "/tmp/x"], "checkpoint not found"),
        (["frobnicate"], "invalid choice"),
        (["train", "--config", "tiny", "parallel.tp=2"], "parallel.tp=2 needs 2 processes but this is one"),
        (["train", "--config", "tiny", "parallel.dp=4", "parallel.pp=2"], "needs 8 processes"),
        (["train", "--config", "tiny", "training.lr=inf"], "training.lr must be a positive finite number"),
        (["train", "--config", "tiny", "training.grad_clip=nan"], "grad_clip=nan"),
        (["train", "--config", "tiny", "checkpoint.async=maybe"], "checkpoint.async_save"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, contains):
    _one_line_error(capsys, argv, contains)


def test_a_bug_keeps_its_traceback_and_exits_1(monkeypatch):
    """Internal errors are not user errors: no one-line message, no exit code 2."""
    import subprocess
    import sys

    import llama3hp.cli as cli

    def broken(_args):
        raise KeyError("internal")  # what a bug looks like: not a llama3hp.errors.UserError

    monkeypatch.setattr(cli, "_cmd_info", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["info", "tiny"])
    # ValueError and OSError are not user errors either, unless raised as a UserError.
    monkeypatch.setattr(cli, "_cmd_info", lambda a: int("not a number"))
    with pytest.raises(ValueError):
        main(["info", "tiny"])
    code = (
        "import sys, llama3hp.cli as c; c._cmd_info = lambda a: {}['x']; sys.exit(c.main(['info', 'tiny']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr, proc.stderr


def test_layouts_a_tied_preset_cannot_split_are_user_errors(capsys):
    _one_line_error(
        capsys,
        ["train", "--config", "tiny", "model.preset=llama3.2_1b", "parallel.pp=2"],
        "ties its embedding",
    )


def test_bad_toml_and_resume_without_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\n")
    _one_line_error(capsys, ["train", "--config", str(bad)], "bad TOML")
    _one_line_error(
        capsys, ["train", "--config", "tiny", f"runs_root={tmp_path}/runs", "--resume"], "nothing to resume"
    )
    _one_line_error(
        capsys, ["train", "--config", "tiny", "--resume", str(tmp_path / "none")], "checkpoint not found"
    )


def test_binary_config_and_garbage_latest_pointer_name_the_file(capsys, tmp_path, weights_ckpt):
    binary = tmp_path / "job.toml"
    binary.write_bytes(b"\x00\xff\xfe\x89PNG")
    _one_line_error(capsys, ["train", "--config", str(binary)], f"config {binary} is not a TOML text file")
    latest = weights_ckpt.parent / "latest"
    latest.write_bytes(b"\x89\x00garbage")
    argv = [
        "export",
        "--checkpoint",
        str(weights_ckpt.parent),
        "--format",
        "hf",
        "--out",
        str(tmp_path / "o"),
    ]
    _one_line_error(capsys, argv, f"{latest} is not a checkpoint pointer")
    latest.write_text("step-00000099\n")
    _one_line_error(capsys, argv, f"{latest} points to a missing checkpoint")


def test_corrupted_checkpoint_is_named(capsys, tmp_path, weights_ckpt):
    shard = next(weights_ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    _one_line_error(
        capsys,
        ["export", "--checkpoint", str(weights_ckpt), "--format", "hf", "--out", str(tmp_path / "o")],
        f"corrupted (SHA-256 mismatch): {shard}",
    )


def test_prepare(capsys, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("def f(x):\n    return x + 1\n")
    assert main(["prepare", str(src), "--out", str(tmp_path / "ds"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["n_tokens"] > 5
    assert "tokens" in capsys.readouterr().out
    _one_line_error(
        capsys, ["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "input not found"
    )


def test_info_json(capsys):
    assert main(["info", "llama3_8b", "--json", "--seq-len", "4096"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 8.0e9 < info["params"]["total"] < 8.1e9 and info["seq_len"] == 4096


def test_export_import_average_roundtrip(capsys, tmp_path, weights_ckpt):
    for fmt in ("hf", "meta"):
        out = tmp_path / f"export-{fmt}"
        assert (
            main(
                [
                    "export",
                    "--checkpoint",
                    str(weights_ckpt.parent),
                    "--format",
                    fmt,
                    "--out",
                    str(out),
                    "--dtype",
                    "float32",
                ]
            )
            == 0
        )
        assert (
            main(["import", "--format", fmt, "--src", str(out), "--out", str(tmp_path / f"imp-{fmt}")]) == 0
        )
        back = ckpt.load_model_state(tmp_path / f"imp-{fmt}")
        orig = ckpt.load_model_state(weights_ckpt)
        assert back.keys() == orig.keys()
        for k in orig:
            assert torch.equal(back[k], orig[k]), k
    assert main(["average", str(weights_ckpt), str(tmp_path / "imp-hf"), "--out", str(tmp_path / "avg")]) == 0
    avg = ckpt.load_model_state(tmp_path / "avg")
    orig = ckpt.load_model_state(weights_ckpt)
    assert all(torch.equal(avg[k], orig[k]) for k in orig)  # the mean of two equal checkpoints
    capsys.readouterr()


def test_train_under_torchrun_runs_the_layout_and_writes_once(tmp_path):
    """`llama3hp train` on 2 torchrun processes (gloo): DP2 with ZeRO-1, one metrics file, one summary."""
    import os
    import subprocess
    import sys

    from tests.train.parallel_harness import SMALL, write_dataset

    data = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "llama3hp.cli", "train", "--config", "tiny", *SMALL, f'data.datasets=["{data}"]',
        "training.steps=2", "parallel.dp=-1", f"run_dir={run}", "checkpoint.enabled=true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["grad_accum"] == 2  # 4 rows = 2 ranks x 2
    assert proc.stdout.count("done: 2 steps") == 1, proc.stdout  # the summary from rank 0 only
    state = ckpt.read_train_state(run / "checkpoints")
    assert state["step"] == 2 and state["parallel"]["dp"] == 2
