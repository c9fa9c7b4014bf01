"""Numerical health: NaN/Inf and spikes are agreed, re-run once, and handled by their policy; a
diverging run stops with one line and never leaves a non-finite checkpoint behind."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama3hp.cli import main
from llama3hp.errors import ConfigError
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.health import HealthConfig, HealthMonitor, TrainingDiverged
from llama3hp.train.trainer import train
from tests.train.parallel_harness import SMALL, build_job, write_dataset

pytestmark = pytest.mark.xdist_group("train_health")


class _Stats:
    def __init__(self, loss: float):
        self.loss = torch.tensor(loss)


def _monitor(**kw) -> HealthMonitor:
    return HealthMonitor(HealthConfig(**kw), None, 0, torch.device("cpu"))


def _step(mon: HealthMonitor, step: int, losses: list[float], norm: float = 1.0):
    """run_step with a compute that returns the next loss of `losses` on each call."""
    calls = []

    def compute(rerun: bool):
        calls.append(rerun)
        return _Stats(losses[len(calls) - 1]), torch.tensor(norm)

    _, _, verdict = mon.run_step(step, compute, lambda: None, {"stop": 0.0})
    return verdict, calls


def test_a_transient_fault_is_rerun_and_a_reproducible_one_meets_its_policy():
    mon = _monitor()
    verdict, calls = _step(mon, 1, [math.nan, 2.0])
    assert calls == [False, True] and verdict.action == "step" and verdict.rerun == "transient"
    verdict, calls = _step(mon, 2, [math.inf, math.nan])
    assert calls == [False, True] and verdict.action == "skip" and verdict.rerun == "reproducible"
    assert verdict.event == "nonfinite" and "step 2" in verdict.message and "rank 0" in verdict.message
    assert verdict.synced == {"stop": 0.0}
    verdict, calls = _step(_monitor(rerun=False), 3, [math.nan])
    assert calls == [False] and verdict.action == "skip" and verdict.rerun is None


def test_spikes_are_judged_after_warmup_against_the_running_median():
    mon = _monitor(spike_factor=2.0, spike_warmup=3, spike_window=4, spike_policy="rollback")
    for step, loss in enumerate([9.0, 5.0, 4.0], 1):  # falling losses are never spikes
        assert _step(mon, step, [loss])[0].action == "step"
    assert _step(mon, 4, [9.0, 9.0])[0].action == "step"  # 9 < 2 x median(9, 5, 4) = 10
    verdict, _ = _step(mon, 5, [12.0, 12.0])  # 12 < 2 x median(9, 5, 4, 9) = 14
    assert verdict.action == "step"
    verdict, _ = _step(mon, 6, [30.0, 30.0])
    assert verdict.action == "rollback" and verdict.event == "spike" and mon.rollbacks == 1
    assert _step(mon, 7, [30.0, 4.0])[0].rerun == "transient"
    warn = _monitor(spike_factor=2.0, spike_warmup=1, spike_policy="warn")
    _step(warn, 1, [1.0])
    verdict, _ = _step(warn, 2, [5.0, 5.0])
    assert verdict.action == "step" and verdict.event == "spike" and "applied" in verdict.message


def test_a_run_that_keeps_diverging_aborts_and_the_state_round_trips():
    mon = _monitor(max_bad_steps=3)
    verdicts = [_step(mon, s, [math.nan] * 2)[0] for s in (1, 2, 3)]
    assert [v.action for v in verdicts] == ["skip", "skip", "abort"]
    assert "3 bad steps in a row (health.max_bad_steps)" in verdicts[-1].message
    abort = _monitor(nan_policy="abort")
    verdict, _ = _step(abort, 9, [math.nan, math.nan], norm=math.inf)
    assert (
        verdict.action == "abort"
        and "step 9: non-finite loss nan / grad norm inf (first seen on rank 0)" in (verdict.message)
    )
    _step(mon := _monitor(), 1, [3.0])
    again = _monitor()
    again.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert again.state_dict() == mon.state_dict() == {"losses": [3.0], "bad_in_a_row": 0, "rollbacks": 0}


@pytest.mark.parametrize(
    "override, match",
    [
        ("training.lr=inf", "training.lr must be a positive finite number"),
        ("training.lr=nan", "training.lr must be a positive finite number"),
        ("training.lr=0", "training.lr must be a positive finite number"),
        ("training.grad_clip=nan", "grad_clip=nan"),
        ("training.grad_clip=-1", "grad_clip must be >= 0"),
        ("health.nan_policy=ignore", "health.nan_policy must be one of skip, rollback, abort"),
        ("health.spike_factor=0.5", "health.spike_factor must be 0"),
    ],
)
def test_validation_refuses_non_finite_and_unknown_settings(override, match):
    from llama3hp.config import load_job_config

    with pytest.raises(ConfigError, match=match):
        load_job_config("tiny", [override])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("health") / "data")


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory):
    """6 healthy steps, the losses a faulty run must reproduce."""
    return train(build_job(dataset, "training.steps=6", f"run_dir={tmp_path_factory.mktemp('clean')}"))


def test_a_transient_nan_gradient_leaves_the_loss_sequence_bit_identical(dataset, clean, tmp_path):
    got = train(
        build_job(dataset, "training.steps=6", f"run_dir={tmp_path}", "fault.kind=nan", "fault.step=3")
    )
    assert got.losses == clean.losses  # the rerun's gradients are the healthy ones, bit for bit
    assert [r.get("rerun") for r in got.rows] == [None, None, "transient", None, None, None]


def test_a_reproducible_nan_is_skipped_on_every_rank_and_logged(dataset, clean, tmp_path):
    job = build_job(
        dataset, "training.steps=4", f"run_dir={tmp_path}", "fault.kind=nan", "fault.step=2",
        "fault.nan_every_run=true",
    )  # fmt: skip
    got = train(job)
    assert got.rows[1]["health_action"] == "skip" and math.isnan(got.rows[1]["grad_norm"])
    assert got.losses[:2] == clean.losses[:2] and got.losses[2] != clean.losses[2]  # no update at step 2
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"], e["action"]) for e in events] == [("nonfinite", 2, "skip")]


def test_rollback_reloads_the_checkpoint_and_skips_the_bad_window(dataset, clean, tmp_path):
    job = build_job(
        dataset, "training.steps=6", f"run_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.interval=2",
        "checkpoint.keep=0", "fault.kind=nan", "fault.step=4", "fault.nan_every_run=true",
        "health.nan_policy=rollback",
    )  # fmt: skip
    got = train(job)
    assert [r["step"] for r in got.rows] == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the rolled-back rows are gone
    assert got.losses[:2] == clean.losses[:2] and got.losses[2] != clean.losses[2]  # other data from 3 on
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert kinds == ["nonfinite", "rollback"]
    # The loader skipped the 2 steps of data that led to the event: 8 rows of 4 more than the clean run.
    state = ckpt.read_train_state(tmp_path / "checkpoints")
    assert sum(state["loader"]["counts"]) == 6 * 4 + 2 * 4 and state["step"] == 6


def test_a_diverging_run_aborts_with_one_line_and_keeps_finite_checkpoints(dataset, tmp_path, capsys):
    args = [
        "train", "--config", "tiny", *SMALL, f'data.datasets=["{dataset}"]', f"run_dir={tmp_path}",
        "training.steps=30", "training.lr=1e4", "health.max_bad_steps=3", "checkpoint.enabled=true",
        "checkpoint.interval=1", "checkpoint.keep=2",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step ") and "3 bad steps in a row" in err[0], err
    assert "first seen on rank 0" in err[0]
    for path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        weights = ckpt.load_model_state(path)
        assert all(torch.isfinite(v).all() for v in weights.values()), path


def test_abort_policy_names_the_step_and_the_rank(dataset, tmp_path):
    job = build_job(
        dataset, "training.steps=4", f"run_dir={tmp_path}", "fault.kind=nan", "fault.step=2",
        "fault.nan_every_run=true", "health.nan_policy=abort",
    )  # fmt: skip
    with pytest.raises(
        TrainingDiverged, match=r"^step 2: non-finite loss .* grad norm nan \(first seen on rank 0\)"
    ):
        train(job)


def test_an_injected_corrupt_token_stops_the_run_with_one_line_naming_the_shard(dataset, tmp_path, capsys):
    args = [
        "train", "--config", "tiny", *SMALL, f'data.datasets=["{dataset}"]', f"run_dir={tmp_path}",
        "training.steps=4", "fault.kind=corrupt", "fault.step=3",
    ]  # fmt: skip
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("error: token id ")
        and "shard_00000.bin at token" in line
        and "the shard is corrupt" in line
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # steps 1-2 trained on clean tokens; step 3 never ran
