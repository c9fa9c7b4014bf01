import math

import pytest

from llama3hp.train.schedules import LRSchedule, batch_rows_at, check_table, lr_at, plan_tokens, seq_len_at


def test_warmup_is_linear_from_the_first_step():
    s = LRSchedule(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(s, 0) == pytest.approx(0.1)
    assert lr_at(s, 4) == pytest.approx(0.5)
    assert lr_at(s, 9) == pytest.approx(1.0)


def test_cosine_midpoint_and_floor():
    s = LRSchedule(lr=2.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(s, 10) == pytest.approx(2.0)
    # halfway through the 100 cosine steps: floor + (peak - floor) / 2
    assert lr_at(s, 60) == pytest.approx(0.2 + 1.8 * 0.5)
    assert lr_at(s, 35) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(s, 110) == pytest.approx(0.2)
    assert lr_at(s, 10_000) == pytest.approx(0.2)


def test_anneal_steps_go_linearly_to_zero_from_the_floor():
    s = LRSchedule(lr=1.0, total_steps=100, warmup_steps=0, min_lr_ratio=0.2, anneal_steps=20)
    # cosine spans steps [0, 80): reaches the floor at 80
    assert lr_at(s, 40) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_at(s, 80) == pytest.approx(0.2)
    assert lr_at(s, 90) == pytest.approx(0.2 * 10 / 20)
    assert lr_at(s, 99) == pytest.approx(0.2 / 20)
    lrs = [lr_at(s, i) for i in range(80, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_anneal_tokens_scales_the_last_tokens_to_zero():
    s = LRSchedule(lr=1.0, total_steps=10, min_lr_ratio=1.0, anneal_tokens=400, total_tokens=1000)
    assert lr_at(s, 0, tokens_seen=0) == pytest.approx(1.0)
    assert lr_at(s, 6, tokens_seen=600) == pytest.approx(1.0)
    assert lr_at(s, 7, tokens_seen=700) == pytest.approx(300 / 400)
    assert lr_at(s, 9, tokens_seen=900) == pytest.approx(100 / 400)
    assert lr_at(s, 10, tokens_seen=1000) == 0.0


def test_batch_ramp_and_sequence_stages():
    ramp = [[0, 4], [1000, 8], [5000, 16]]
    assert batch_rows_at(ramp, 0, 2) == 4
    assert batch_rows_at(ramp, 999, 2) == 4
    assert batch_rows_at(ramp, 1000, 2) == 8
    assert batch_rows_at(ramp, 10**9, 2) == 16
    assert batch_rows_at([[100, 8]], 50, 2) == 2  # default before the first threshold
    stages = [[0, 8192], [100, 16384], [200, 131072]]
    assert [seq_len_at(stages, t, 4096) for t in (0, 99, 100, 250)] == [8192, 8192, 16384, 131072]


def test_plan_tokens_walks_the_ramp():
    # rows 2 x seq 10 = 20 tokens per step until 40 seen, then 4 x 10
    assert plan_tokens(4, 2, 10, ramp=[[40, 4]]) == 20 + 20 + 40 + 40
    assert plan_tokens(3, 2, 10, stages=[[20, 30]]) == 20 + 60 + 60


@pytest.mark.parametrize("table", [[[0]], [[0, 0]], [[10, 2], [5, 4]], [[-1, 2]]])
def test_bad_tables_are_rejected(table):
    with pytest.raises(ValueError, match="tr"):
        check_table("tr", table)
