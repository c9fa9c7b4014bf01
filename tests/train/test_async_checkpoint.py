"""Async checkpoints, full disks and start-up checks: what survives a failure of the save itself."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from llama3hp.errors import ConfigError
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.checkpointer import CheckpointConfig, Checkpointer, all_finite, latest_complete
from llama3hp.train.trainer import Trainer, train
from tests.train.parallel_harness import build_job, write_dataset

pytestmark = pytest.mark.xdist_group("train_health")


def _checkpointer(folder, async_save: bool, keep: int = 0):
    from llama3hp.parallel.step_model import LocalModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    cfg = CheckpointConfig(interval=1, keep=keep, async_save=async_save)
    return Checkpointer(cfg, folder, LocalModel(model), opt, None, lambda: {"tokens_seen": 0}), model


def test_async_and_sync_saves_write_the_same_checkpoint(tmp_path):
    for name, async_save in (("sync", False), ("async", True)):
        cp, _ = _checkpointer(tmp_path / name, async_save)
        assert cp.maybe_save(1, last=False) is not None and cp.maybe_save(2, last=True) is not None
        assert cp.pending is None and cp.last == tmp_path / name / "step-00000002"
        ckpt.verify_checkpoint(cp.last)
    a, b = (ckpt.load_model_state(tmp_path / n) for n in ("sync", "async"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files = [
        sorted(json.loads((tmp_path / n / "step-00000002" / ckpt.MANIFEST).read_text())["files"])
        for n in ("sync", "async")
    ]
    assert files[0] == files[1]


def test_a_failed_background_write_leaves_the_previous_checkpoint_and_no_temp_folder(tmp_path, monkeypatch):
    cp, _ = _checkpointer(tmp_path, async_save=True)
    cp.save(1)
    cp.wait()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", full)
    cp.save(2)  # returns once staged; the write fails in the background
    with pytest.raises(
        ckpt.CheckpointError, match=rf"^no space left for checkpoints in {tmp_path} \(\d+\.\d\d GiB free\)"
    ):
        cp.wait()
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000001" and not list(tmp_path.glob("*.tmp"))
    cp.load(tmp_path)  # the previous checkpoint still loads


def test_a_full_disk_on_a_sync_save_is_one_line_and_removes_the_partial_folder(tmp_path, monkeypatch):
    cp, _ = _checkpointer(tmp_path, async_save=False)
    cp.save(1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", full)
    with pytest.raises(
        ckpt.CheckpointError, match="^no space left for checkpoints in .*GiB free.*checkpoint.dir"
    ) as e:
        cp.save(2)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.tmp")) and ckpt.resolve_checkpoint(tmp_path).name == "step-00000001"


CRASH = textwrap.dedent(
    """
    import sys, time
    import torch.distributed.checkpoint.filesystem as fs
    from tests.train.test_async_checkpoint import _checkpointer
    from pathlib import Path
    cp, _ = _checkpointer(Path(sys.argv[1]), async_save=True)
    cp.save(1); cp.wait()
    real = fs._write_item
    def slow(*a, **k):
        print("writing", flush=True)
        time.sleep(60)
        return real(*a, **k)
    fs._write_item = slow
    cp.save(2)
    time.sleep(60)
    """
)


def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH, str(tmp_path)], stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert (tmp_path / "step-00000002.tmp").is_dir()  # the write was cut short
    assert latest_complete(tmp_path) == tmp_path / "step-00000001"
    cp, model = _checkpointer(tmp_path, async_save=True)
    cp.load(tmp_path)
    cp.save(2, wait=True)  # the stale temp folder is replaced
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000002" and not list(tmp_path.glob("*.tmp"))


def test_non_finite_state_is_never_saved(tmp_path):
    cp, model = _checkpointer(tmp_path, async_save=False)
    cp.save(1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    assert not all_finite(cp.model.checkpoint_state(cp.optimizer, for_save=True), None)
    cp.save(2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("async") / "data")


def test_an_unwritable_checkpoint_folder_fails_before_any_work(dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    built = []
    monkeypatch.setattr("llama3hp.train.build.build_model", lambda *a, **k: built.append(1))
    job = build_job(
        dataset, f"run_dir={tmp_path}/run", "checkpoint.enabled=true", f"checkpoint.dir={blocker}/ck"
    )
    with pytest.raises(ConfigError, match=rf"the checkpoint folder {blocker}/ck is not writable"):
        Trainer(job)
    assert built == []


def test_trainer_rows_record_the_time_each_save_blocked(dataset, tmp_path):
    job = build_job(
        dataset, "training.steps=4", f"run_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.interval=2",
        "checkpoint.async=true",
    )  # fmt: skip
    result = train(job)
    assert [("checkpoint_block_s" in r) for r in result.rows] == [False, True, False, True]
    assert result.last_checkpoint == tmp_path / "checkpoints" / "step-00000004"
    assert ckpt.read_train_state(result.last_checkpoint)["step"] == 4
