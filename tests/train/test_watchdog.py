"""Hang detection, straggler reports, fault schedules and telemetry agreement, without processes."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from llama3hp.train.faults import FaultConfig, FaultInjector, schedule
from llama3hp.train.metrics import telemetry_columns, telemetry_extra
from llama3hp.train.watchdog import (
    EXIT_HUNG,
    SECTIONS,
    StepSections,
    Watchdog,
    WatchdogConfig,
    straggler_columns,
)


class FakeStore:
    """The part of a c10d Store the watchdog uses, shared by every rank of a test."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def clone(self):
        return self

    def set_timeout(self, _):
        pass

    def set(self, key, value):
        self.data[key] = value.encode()

    def multi_get(self, keys):
        return [self.data[k] for k in keys]


def _watchdog(store, rank, sections, exits, tmp_path, **cfg):
    config = WatchdogConfig(
        hang_floor_s=0.2, heartbeat_s=0.05, phase_timeout_s=0.3, kill_hung_peers=False, **cfg
    )
    lines: list[str] = []
    wd = Watchdog(
        config, rank=rank, world=3, store=store, sections=sections, dump_dir=tmp_path / "hangs",
        log=lines.append, exit=exits.append,
    )  # fmt: skip
    return wd, lines


def test_a_hung_step_names_the_silent_and_the_slow_ranks_dumps_stacks_and_exits(tmp_path):
    store = FakeStore()
    exits: list[int] = []
    mine, behind = StepSections(torch.device("cpu")), StepSections(torch.device("cpu"))
    wd, lines = _watchdog(store, 0, mine, exits, tmp_path)
    peer, _ = _watchdog(store, 2, behind, [], tmp_path)  # a live peer that is behind
    peer.close()  # ...whose thread we drive by hand below
    store.set("llama3hp/heartbeat/1", f"7 1 {os.uname().nodename} 999999")  # never beats again
    for _ in range(3):  # three quick steps give the median
        with wd.watch("step", is_step=True):
            mine.progress += 3
    assert wd.timeout(is_step=True) == pytest.approx(0.2)  # the floor: 10 x ~0 s is less
    stop = threading.Event()

    def keep_beating():  # rank 2 is alive (its beat moves) but behind (its progress does not)
        while not stop.is_set():
            peer._publish()
            time.sleep(0.02)

    beater = threading.Thread(target=keep_beating, daemon=True)
    beater.start()
    try:
        with wd.watch("step 4", is_step=True):
            deadline = time.monotonic() + 10
            while not exits and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        stop.set()
        wd.close()
    assert exits == [EXIT_HUNG], lines
    (line,) = lines
    assert line.startswith("error: rank 0: step 4 has run") and "deadline" in line
    assert "ranks [1] have no heartbeat" in line and "ranks [2] are behind" in line
    assert (tmp_path / "hangs" / "attempt0-rank0-stacks.txt").read_text().count("Thread") >= 2


def test_the_first_steps_and_other_phases_get_the_phase_timeout(tmp_path):
    wd, _ = _watchdog(None, 0, StepSections(torch.device("cpu")), [], tmp_path, enabled=False)
    assert wd.timeout(is_step=True) == wd.timeout(is_step=False) == 0.3
    for s in (1.0, 2.0, 3.0):
        wd.times.append(s)
    assert wd.timeout(is_step=True) == 20.0 and wd.timeout(is_step=False) == 0.3


def test_stragglers_are_flagged_per_section_against_the_median():
    rows = [
        [0.01, 0.50, 0.02, 0.1],
        [0.01, 0.50, 0.02, 0.1],
        [0.30, 0.21, 0.02, 0.1],
        [0.01, 0.50, 0.02, 0.1],
    ]
    cols = straggler_columns(rows, 1.5)
    assert cols["stragglers"] == [{"rank": 2, "section": "data", "s": 0.3, "median_s": 0.01}]
    assert cols["time_data_max_s"] == 0.3 and cols["time_forward_backward_min_s"] == 0.21
    assert (
        straggler_columns([[0.001, 0.5, 0, 0], [0.004, 0.5, 0, 0]], 1.5)["stragglers"] == []
    )  # < 10 ms apart


def test_sections_time_each_part_of_a_step():
    s = StepSections(torch.device("cpu"))
    for name in SECTIONS:
        with s.section(name):
            time.sleep(0.002)
    s.end_step()
    cols = s.gather(None, 1.5)
    assert all(cols[f"time_{n}_max_s"] > 0 for n in SECTIONS) and cols["stragglers"] == [] and s.progress == 4


def test_the_fault_schedule_is_seeded_and_one_fault_fires_per_attempt():
    cfg = FaultConfig(every=10, kinds=["kill", "hang", "nan"], seed=3)
    plan = schedule(cfg, 4, 100)
    assert plan == schedule(cfg, 4, 100) and 6 <= len(plan) <= 20
    assert all(5 <= b.step - a.step <= 15 for a, b in zip(plan, plan[1:])) and {f.rank for f in plan} <= {
        0,
        1,
        2,
        3,
    }
    first = plan[0]
    inj = FaultInjector(cfg, rank=first.rank, world=4, total_steps=100, attempt=0)
    assert inj.fault == first
    assert FaultInjector(cfg, rank=(first.rank + 1) % 4, world=4, total_steps=100, attempt=0).fault is None
    single = FaultConfig(kind="nan", step=5, rank=0, attempt=1)
    assert FaultInjector(single, rank=0, world=1, total_steps=9, attempt=0).fault is None
    assert FaultInjector(single, rank=0, world=1, total_steps=9, attempt=1).fault.step == 5  # type: ignore[union-attr]


def test_a_nan_fault_hits_one_step_once_and_its_rerun_only_when_asked():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for every_run, rerun_is_nan in ((False, False), (True, True)):
        inj = FaultInjector(
            FaultConfig(kind="nan", step=2, nan_every_run=every_run),
            rank=0,
            world=1,
            total_steps=5,
            attempt=0,
        )
        for step in (1, 2, 2):  # step 2, then its replay after a rollback
            p.grad = torch.zeros(3)
            inj.before_step(step)
            inj.after_backward(opt, rerun=False)
            first = bool(p.grad.isnan().any())
            p.grad = torch.zeros(3)
            inj.after_backward(opt, rerun=True)
            assert (first, bool(p.grad.isnan().any())) == (
                (step == 2 and inj.armed, rerun_is_nan and step == 2 and inj.armed)
            )
        assert inj.fired


def test_telemetry_min_and_max_over_ranks_ride_on_one_max_all_reduce():
    readings = [{"gpu_temp_c": 61.0, "gpu_power_w": 500.0}, {"gpu_temp_c": 70.0}, {}]
    extras = [telemetry_extra(r) for r in readings]
    agreed = {k: max(e[k] for e in extras) for k in extras[0]}  # what dist.all_reduce(MAX) gives
    cols = telemetry_columns(agreed)
    assert cols == {
        "gpu_temp_c_max": 70.0,
        "gpu_temp_c_min": 61.0,
        "gpu_power_w_max": 500.0,
        "gpu_power_w_min": 500.0,
    }
    assert telemetry_columns({k: max(e[k] for e in extras[2:]) for k in extras[0]}) == {}  # no GPU anywhere
