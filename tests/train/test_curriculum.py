"""The long-context curriculum in one launch: at a stage boundary the trainer re-plans its mesh
in-process (CP up, DP down), reshards through DCP and trains on exactly where the loader was."""

from __future__ import annotations

import json

import pytest

from llama3hp.config import load_job_config
from llama3hp.errors import ConfigError
from llama3hp.parallel.plan import plan
from llama3hp.train.schedules import batch_rows_at, seq_len_at
from llama3hp.train.stages import auto_cp, check_stages, stage_parallel
from llama3hp.train.trainer import train
from tests.train.parallel_harness import SMALL, build_job, spawn_trainers, write_dataset

pytestmark = pytest.mark.xdist_group("train_curriculum")

# 8 rows of 64 tokens for 2 steps (CP1 x DP8), then rows of 256 tokens (CP4 x DP2): the boundary
# is at 2 x 8 x 64 = 1024 tokens.
CURRICULUM = [
    "model.max_seq_len=256", "training.seq_len=64", "training.global_batch_rows=8", "training.steps=4",
    "training.seq_len_stages=[[1024, 256, 4]]",
]  # fmt: skip


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    dataset = write_dataset(root / "data")
    ref = train(build_job(dataset, *CURRICULUM, f"run_dir={root}/ref"))  # one process: stage CP ignored
    case = {
        "name": "cp1_to_cp4",
        "dataset": dataset,
        "rows": True,
        "overrides": [
            *CURRICULUM, "parallel.dp=-1", f"run_dir={root}/mesh", "checkpoint.enabled=true",
            "checkpoint.async=true", "checkpoint.interval=100", "fault.kind=slow", "fault.rank=5",
            "fault.slow_ms=300", "watchdog.straggler_interval=2",
        ],
    }  # fmt: skip
    results = spawn_trainers(8, [case])
    return root, ref, results


def test_stages_64_to_256_tokens_with_cp_1_to_4_reproduce_one_process(curriculum):
    root, ref, results = curriculum
    per_rank = [r["cp1_to_cp4"] for r in results]
    assert all("error" not in r for r in per_rank), [r.get("error") for r in per_rank if "error" in r][:1]
    for r in per_rank:
        assert [x["seq_len"] for x in r["rows"]] == [64, 64, 256, 256]
        assert r["mesh"] == (1, 4, 1, 2)  # tp, cp, pp, dp after the boundary
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(r["losses"], ref.losses)), (
            r["losses"],
            ref.losses,
        )
    assert [x["grad_accum"] for x in per_rank[0]["rows"]] == [1, 1, 4, 4]  # 8 rows over DP8, then DP2
    events = [json.loads(x) for x in (root / "mesh" / "events.jsonl").read_text().splitlines()]
    replan = [e for e in events if e["kind"] == "replan"]
    assert (
        len(replan) == 1
        and replan[0]["step"] == 2
        and "CP1 PP1 DP8 -> TP1 CP4 PP1 DP2" in replan[0]["message"]
    )


def test_a_slowed_rank_is_flagged_as_a_data_straggler(curriculum):
    _, _, results = curriculum
    rows = results[0]["cp1_to_cp4"]["rows"]
    flagged = [s for row in rows if "stragglers" in row for s in row["stragglers"]]
    assert any(s["rank"] == 5 and s["section"] == "data" and s["s"] >= 0.3 for s in flagged), flagged
    assert rows[1]["time_data_max_s"] >= 0.3 > rows[1]["time_data_min_s"]


def test_stage_layouts_are_checked_at_every_threshold(tmp_path):
    job = load_job_config("tiny", [*SMALL, *CURRICULUM])
    check_stages(job, 8)
    assert stage_parallel(job, 1024, 8).cp == 4 and stage_parallel(job, 0, 8).cp == 1
    bad = load_job_config("tiny", [*SMALL, *CURRICULUM, "training.seq_len_stages=[[1024, 256, 3]]"])
    with pytest.raises(ConfigError, match="at 1,024 tokens .*cp 3"):
        check_stages(bad, 8)
    with pytest.raises(ConfigError, match="layout is a context-parallel degree"):
        load_job_config("tiny", ["training.seq_len_stages=[[1024, 256, 0]]"])


def test_the_405b_recipe_runs_8k_to_128k_in_one_launch_each_stage_fitting_80_gib():
    job = load_job_config("llama3_405b", [])
    world = 8192
    check_stages(job, world)  # layouts, batch splits and interleaved schedules of every stage
    t, p = job.training, job.parallel
    seen = []
    for tokens in sorted({0, *(r[0] for r in t.batch_ramp), *(s[0] for s in t.seq_len_stages)}):
        cfg = stage_parallel(job, tokens, world)
        rows, seq = (
            batch_rows_at(t.batch_ramp, tokens, t.global_batch_rows),
            seq_len_at(t.seq_len_stages, tokens, t.seq_len),
        )
        r = plan(
            "llama3_405b", p.tp, cfg.cp, p.pp, world // (p.tp * cfg.cp * p.pp), seq, rows,
            virtual=p.pp_virtual_stages, zero_stage=p.zero_stage, checkpointing=t.activation_checkpointing,
            checkpoint_every=t.activation_checkpointing_every,
        )  # fmt: skip
        assert r.mem_total_gib <= 80.0, (tokens, seq, cfg.cp, r.mem_total_gib)
        seen.append((seq, cfg.cp))
        # "auto" in place of the degree picks the same: the smallest CP that fits.
        assert auto_cp(job, world, seq, rows) == cfg.cp, (tokens, seq)
    assert seen[0] == (4096, 1) and seen[-1] == (131072, 16)  # the paper's 128K layout: TP8 CP16 PP16 DP4
    assert [cp for _, cp in seen] == sorted(cp for _, cp in seen)  # CP only grows
