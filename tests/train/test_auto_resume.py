"""A run that restarts itself: training.resume=auto, stop requests, and one metrics row per step."""

from __future__ import annotations

import json

import pytest

from llama3hp.cli import main
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.preemption import STOP_FILE
from llama3hp.train.trainer import Trainer, train
from tests.train.parallel_harness import SMALL, build_job, write_dataset

pytestmark = pytest.mark.xdist_group("train_health")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("resume") / "data")


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_auto_resume_continues_the_run_folder_bit_exactly_and_never_duplicates_rows(dataset, tmp_path):
    common = ["checkpoint.enabled=true", "checkpoint.interval=2", "checkpoint.keep=0", "training.resume=auto"]
    ref = train(build_job(dataset, "training.steps=6", f"run_dir={tmp_path}/ref", *common))
    run = tmp_path / "run"
    first = train(build_job(dataset, "training.steps=6", f"run_dir={run}", *common))
    # A crash after step 5: the checkpoint of step 4 is the latest, step 5's row is in metrics.jsonl.
    ckpt.list_checkpoints(run / "checkpoints")  # (the folders exist)
    (run / "checkpoints" / "latest").write_text("step-00000004\n")
    for p in ckpt.list_checkpoints(run / "checkpoints"):
        if p.name == "step-00000006":
            import shutil

            shutil.rmtree(p)
    again = train(build_job(dataset, "training.steps=6", f"run_dir={run}", *common))
    assert [r["step"] for r in again.rows] == [5, 6]
    assert again.losses == ref.losses[4:] and first.losses == ref.losses
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]  # the replayed steps replaced their rows
    assert [r["loss"] for r in _rows(run)] == ref.losses
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in events] == [("resume", 4)]
    done = train(build_job(dataset, "training.steps=6", f"run_dir={run}", *common))  # complete: nothing to do
    assert done.rows == [] and [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]


def test_auto_without_a_checkpoint_starts_in_the_stable_folder(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = build_job(
        dataset, "training.steps=1", "training.resume=auto", "name=auto", f"runs_root={tmp_path}/runs"
    )
    assert Trainer(job).run_dir == tmp_path / "runs" / "auto"  # the same folder for every restart


def test_a_stop_request_checkpoints_and_returns_then_auto_resumes_exactly(dataset, tmp_path, monkeypatch):
    common = [
        "training.steps=6",
        "checkpoint.enabled=true",
        "checkpoint.interval=100",
        "training.resume=auto",
    ]
    ref = train(build_job(dataset, *common, f"run_dir={tmp_path}/ref"))
    run = tmp_path / "run"
    trainer = Trainer(build_job(dataset, *common, f"run_dir={run}"))
    real = trainer.train_step

    def step_then_ask_to_stop():
        out = real()
        if trainer.step == 3:
            (run / STOP_FILE).write_text("")  # what the Slurm script's signal trap does
        return out

    trainer.train_step = step_then_ask_to_stop  # type: ignore[method-assign]
    stopped = trainer.run()
    assert stopped.stopped and [r["step"] for r in stopped.rows] == [
        1,
        2,
        3,
        4,
    ]  # seen at step 4's all-reduce
    assert ckpt.read_train_state(run / "checkpoints")["step"] == 4
    resumed = train(build_job(dataset, *common, f"run_dir={run}"))  # the requeued job: the stale file goes
    assert not (run / STOP_FILE).exists() and not resumed.stopped
    assert stopped.losses + resumed.losses == ref.losses


def test_bare_resume_finds_the_checkpoints_of_run_dir(dataset, tmp_path, capsys):
    args = ["train", "--config", "tiny", *SMALL, f'data.datasets=["{dataset}"]', f"run_dir={tmp_path}"]
    assert main([*args, "training.steps=2", "checkpoint.enabled=true"]) == 0
    assert main([*args, "training.steps=3", "checkpoint.enabled=true", "--resume"]) == 0
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    assert main([*args, "training.steps=3", f"runs_root={tmp_path}/empty", "run_dir=", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
