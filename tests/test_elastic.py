"""A real torchrun job that manages itself: a killed rank and a hung (SIGSTOPped) rank are both
survived by elastic restarts that re-form the gloo group and resume the latest checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama3hp.train.faults import FaultConfig, schedule
from llama3hp.train.trainer import train
from tests.train.parallel_harness import SMALL, build_job, write_dataset

# Fault schedule of seed 1 over 8 steps on 2 ranks: attempt 0 loses rank 1 to SIGKILL at step 3,
# attempt 1 loses it to SIGSTOP at step 5 (the watchdog of rank 0 names it and takes it down).
# Synchronous saves: an async save in flight when a rank dies is lost with it (a race), which would
# make the resumed steps vary from run to run.
ROOT = Path(__file__).resolve().parent.parent
CHAOS = ["fault.every=4", 'fault.kinds=["kill","hang"]', "fault.seed=1"]
WATCHDOG = ["watchdog.hang_floor_s=2", "watchdog.heartbeat_s=0.5", "watchdog.phase_timeout_s=8"]


@pytest.mark.slow
def test_torchrun_restarts_survive_a_kill_and_a_hang(tmp_path):
    """launch/torchrun.sh on 2 gloo ranks with a fault schedule: every failure survived, each step
    logged once, the losses those of one uninterrupted process."""
    assert [
        (f.kind, f.step, f.rank) for f in schedule(FaultConfig(every=4, kinds=["kill", "hang"], seed=1), 2, 8)
    ] == [
        ("kill", 3, 1),
        ("hang", 5, 1),
    ]
    data = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    # The launch script itself: its --check preflight, torchrun --max-restarts and training.resume=auto.
    cmd = [
        "bash", str(ROOT / "launch" / "torchrun.sh"), "tiny", *SMALL, f'data.datasets=["{data}"]', "training.steps=8",
        "parallel.dp=-1", f"run_dir={run}", "checkpoint.enabled=true", "checkpoint.interval=2", *CHAOS, *WATCHDOG,
    ]  # fmt: skip
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHON": sys.executable, "NGPUS": "2",
        "MAX_RESTARTS": "2",
    }  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in events] == [("resume", 2), ("resume", 4)], events
    hang_lines = [line for line in out.splitlines() if line.startswith("error: rank 0: step 5 has run")]
    assert len(hang_lines) == 1 and "ranks [1] have no heartbeat" in hang_lines[0], out[-4000:]
    assert (run / "hangs" / "attempt1-rank0-stacks.txt").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # each step once, across three attempts
    # The same training as one uninterrupted process (DP2 sums in another order: fp32 tolerance).
    ref = train(build_job(data, "training.steps=8", f"run_dir={tmp_path}/ref"))
    assert all(abs(r["loss"] - x) <= 1e-5 * abs(x) for r, x in zip(rows, ref.losses)), (
        [r["loss"] for r in rows],
        ref.losses,
    )


def test_the_launch_preflight_turns_a_layout_error_into_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "NGPUS": "4"}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "tiny", "parallel.tp=3"], env=env, capture_output=True,
        text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: world size 4 is not divisible by tp*cp*pp = 3: change the degrees or the number of ranks"
    ], proc.stderr
