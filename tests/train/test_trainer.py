"""End-to-end training on a shrunk Llama 3 (dim 64, 2 layers, full vocabulary) on CPU."""

import json
import math

import pytest
from train_testing import SMALL

from llama3hp.cli import main
from llama3hp.config import ConfigError, load_job_config
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.trainer import train

# One xdist worker builds the module fixtures (small dataset, reference run) once for all tests.
pytestmark = pytest.mark.xdist_group("train_e2e")


def _job(tmp_path, dataset, *extra):
    return load_job_config(
        "tiny", [*SMALL, f'data.datasets=["{dataset}"]', f"runs_root={tmp_path}/runs", *extra]
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_dataset):
    """6 uninterrupted steps with a checkpoint every 3 steps."""
    tmp = tmp_path_factory.mktemp("ref")
    job = _job(
        tmp,
        small_dataset,
        "training.steps=6",
        "checkpoint.interval=3",
        "checkpoint.keep=0",
        f"run_dir={tmp}/run",
        "metrics.profile_steps=[1, 2]",
    )
    return train(job)


def test_resume_is_bit_exact(tmp_path, small_dataset, reference_run):
    mid = reference_run.run_dir / "checkpoints" / "step-00000003"
    assert ckpt.read_train_state(mid)["step"] == 3
    job = _job(tmp_path, small_dataset, "training.steps=6", f"run_dir={tmp_path}/resumed")
    resumed = train(job, resume=mid)
    assert [r["step"] for r in resumed.rows] == [4, 5, 6]
    ref = reference_run.rows[3:]
    assert [r["loss"] for r in resumed.rows] == [r["loss"] for r in ref]  # exact, not approximate
    assert [r["grad_norm"] for r in resumed.rows] == [r["grad_norm"] for r in ref]
    a = ckpt.load_model_state(reference_run.last_checkpoint)
    b = ckpt.load_model_state(resumed.last_checkpoint)
    assert all((a[k] == b[k]).all() for k in a)


def test_run_folder_and_metrics_rows(reference_run):
    run = reference_run.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    fields = {
        "loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "peak_mem_gib",
        "tokens_seen",
        "step_time_s",
        "flops_per_token",
        "seq_len",
        "global_batch_rows",
    }
    assert all(fields <= set(r) for r in rows)
    assert rows[0]["lr"] == pytest.approx(1.5e-3) and rows[1]["lr"] == pytest.approx(3e-3)
    assert rows[-1]["tokens_seen"] == 6 * 2 * 64
    assert all(0 < r["mfu"] < 1 and math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert (run / "loss.png").stat().st_size > 1000
    assert json.loads((run / "config.json").read_text())["training"]["steps"] == 6
    trace = next(run.glob("trace-steps-1-2.json"))
    assert "traceEvents" in json.loads(trace.read_text())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_cli_resume_reuses_the_stored_config_and_catches_corruption(capsys, tmp_path, reference_run):
    mid = reference_run.run_dir / "checkpoints" / "step-00000003"
    code = main(
        [
            "train",
            "--resume",
            str(mid),
            "training.steps=4",
            f"run_dir={tmp_path}/cli",
            "checkpoint.enabled=false",
        ]
    )
    assert code == 0
    assert [json.loads(x)["step"] for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()] == [
        4
    ]
    assert (
        json.loads((tmp_path / "cli" / "metrics.jsonl").read_text())["loss"] == reference_run.rows[3]["loss"]
    )
    capsys.readouterr()
    import shutil

    broken = tmp_path / "broken" / "step-00000003"
    shutil.copytree(mid, broken)
    shard = next(broken.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    code = main(["train", "--resume", str(broken), f"run_dir={tmp_path}/cli2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "corrupted" in err[0] and shard.name in err[0]


def test_init_from_starts_a_fresh_run_from_weights(tmp_path, small_dataset, reference_run):
    final = reference_run.last_checkpoint
    job = _job(
        tmp_path,
        small_dataset,
        "training.steps=1",
        "training.warmup_steps=0",
        f"training.init_from={final.parent}",
        "checkpoint.enabled=false",
        f"run_dir={tmp_path}/init",
    )
    rows = train(job).rows
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] < reference_run.rows[0]["loss"] - 0.3  # trained weights, same first batch
    bad = _job(
        tmp_path, small_dataset, "model.dim=32", f"training.init_from={final}", f"run_dir={tmp_path}/bad"
    )
    with pytest.raises(ckpt.CheckpointError, match="shape"):
        train(bad)


def test_grad_accumulation_is_exact_and_schedules_drive_the_batch(tmp_path, small_dataset):
    common = [
        "training.steps=2",
        "training.global_batch_rows=4",
        "checkpoint.enabled=false",
        "metrics.jsonl=false",
    ]
    one = train(
        _job(tmp_path, small_dataset, *common, "training.micro_batch_rows=4", f"run_dir={tmp_path}/a")
    )
    two = train(
        _job(tmp_path, small_dataset, *common, "training.micro_batch_rows=2", f"run_dir={tmp_path}/b")
    )
    assert [r["grad_accum"] for r in two.rows] == [2, 2]
    for r1, r2 in zip(one.rows, two.rows):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    staged = train(
        _job(
            tmp_path,
            small_dataset,
            "training.steps=3",
            "checkpoint.enabled=false",
            f"run_dir={tmp_path}/c",
            "training.batch_ramp=[[128, 4]]",
            "training.seq_len_stages=[[256, 32]]",
        )
    )
    # step 1: 2 x 64 = 128 tokens; step 2: 4 x 64 (ramp at 128); step 3: 4 x 32 (stage at 256)
    assert [(r["global_batch_rows"], r["seq_len"]) for r in staged.rows] == [(2, 64), (4, 64), (4, 32)]
    assert staged.rows[-1]["tokens_seen"] == 128 + 256 + 128


@pytest.mark.slow
@pytest.mark.xdist_group("train_corpus")
def test_loss_falls_on_the_default_corpus(tmp_path):
    """30 steps on the stdlib corpus (prepared once into data/, as `make train` does)."""
    from llama3hp.train.metrics import smoothed

    job = load_job_config(
        "tiny",
        [
            *SMALL,
            "training.steps=30",
            "training.warmup_steps=3",
            "training.seq_len=128",
            "training.lr=1e-2",
            f"run_dir={tmp_path}/run",
            "checkpoint.enabled=false",
        ],
    )
    result = train(job)
    losses = result.losses
    assert losses[0] > 11.0  # ~ln(128256) = 11.76 at init
    assert smoothed(losses, 0.3)[-1] < 9.5, losses  # well below; ~8.5 measured


def test_activation_checkpointing_trains_the_same_steps(tmp_path, small_dataset):
    common = ["training.steps=2", "checkpoint.enabled=false", "metrics.jsonl=false"]
    plain = train(_job(tmp_path, small_dataset, *common, f"run_dir={tmp_path}/a"))
    ac = train(
        _job(
            tmp_path,
            small_dataset,
            *common,
            "training.activation_checkpointing=full",
            f"run_dir={tmp_path}/b",
        )
    )
    assert [r["loss"] for r in ac.rows] == [r["loss"] for r in plain.rows]  # exact: the same forward, rerun
    assert [r["grad_norm"] for r in ac.rows] == [r["grad_norm"] for r in plain.rows]


def test_bf16_zero3_gathers_need_bf16_autocast(tmp_path, small_dataset):
    with pytest.raises(ConfigError, match="zero3_gather_dtype=bfloat16 rounds the weights"):
        train(_job(tmp_path, small_dataset, "parallel.zero3_gather_dtype=bfloat16", "training.dtype=float32"))


def test_a_checkpoint_written_before_the_one_path_refactor_resumes_exactly(tmp_path):
    """A one-process checkpoint saved by llama3hp 553fdf9 (its optimizer state carried param_groups;
    the model had no OutputHead module) resumes and trains the steps that run went on to train."""
    from pathlib import Path

    from tests.train.parallel_harness import write_dataset

    fixture = Path(__file__).parent / "fixtures" / "v0.1-one-process"
    expected = json.loads((fixture / "expected.json").read_text())
    data = write_dataset(tmp_path / "data")
    job = load_job_config(
        "tiny",
        [
            *expected["overrides"],
            f'data.datasets=["{data}"]',
            f"run_dir={tmp_path}/run",
            "checkpoint.enabled=false",
        ],
    )
    resumed = train(job, resume=fixture / "step-00000002")
    assert [r["step"] for r in resumed.rows] == [3, 4]
    assert resumed.losses == expected["losses"][2:]
    assert [r["grad_norm"] for r in resumed.rows] == expected["grad_norms"][2:]
