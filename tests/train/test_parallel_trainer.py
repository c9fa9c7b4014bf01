"""The real Trainer on a 4D mesh trains like one process, and its checkpoints reshard across layouts.

ONE spawned group of 8 gloo ranks runs every case in turn (tests/train/parallel_harness.py); the
single-process references run in the test process. Every case: 4 AdamW steps of 4 rows x 32
tokens on packed random documents, grad clipping and weight decay.
"""

from __future__ import annotations

import json

import pytest

from llama3hp.train import checkpoint as ckpt
from llama3hp.train.trainer import Trainer
from tests.train.parallel_harness import build_job, spawn_trainers, write_dataset

pytestmark = pytest.mark.xdist_group("train_parallel")

TOL_LOSS, TOL_PARAM = 1e-5, 5e-5
STEPS = ["training.steps=4"]
LAYOUTS = {
    "tp2": ["parallel.tp=2", "parallel.dp=1"],
    "pp2": ["parallel.pp=2", "parallel.dp=1"],
    "dp2_zero1": ["parallel.dp=2", "parallel.zero_stage=1"],
    "dp2_tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1"],
}


# Row-wise FP8 (emulated GEMMs on CPU) against the one-process FP8 run: PP x DP feeds every FP8 GEMM
# the rows one process does (one-row micro-batches), so the first step's loss is equal and later ones
# drift only where fp32 rounding of the sharded optimizer tips an FP8 rounding (TOL_LOSS_FP8_ROWS);
# TP quantizes per shard where a GEMM reduces over one: FP8 tolerance (tests/parallel/test_fp8_tp.py).
FP8 = ["fp8.recipe=rowwise"]
FP8_LAYOUTS = {
    "fp8_pp2_dp2": [*FP8, "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1"],
    "fp8_tp2_dp2": [*FP8, "parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=2"],
}
TOL_LOSS_FP8_ROWS, TOL_LOSS_FP8_TP = 2e-4, 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptrain")
    dataset = write_dataset(root / "data")
    trainer = Trainer(build_job(dataset, *STEPS, f"run_dir={root}/ref"))
    ref = trainer.run()
    ref_params = trainer.model.full_state_dict()
    fp8_trainer = Trainer(build_job(dataset, *STEPS, *FP8, f"run_dir={root}/ref_fp8"))
    ref_fp8 = fp8_trainer.run()
    ck = root / "tp2pp2" / "checkpoints"
    mid = ck / "step-00000002"
    cases = [
        {"name": n, "dataset": dataset, "params": True, "overrides": [*STEPS, *o, f"run_dir={root}/{n}"]}
        for n, o in LAYOUTS.items()
    ]
    cases += [
        {"name": n, "dataset": dataset, "overrides": [*STEPS, *o, f"run_dir={root}/{n}"]}
        for n, o in FP8_LAYOUTS.items()
    ]
    cases += [
        {  # run-level files from rank 0 only; the run folder is picked by rank 0 and broadcast
            "name": "tp2_pp2_ckpt",
            "dataset": dataset,
            "overrides": [
                *STEPS,
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.dp=1",
                "checkpoint.enabled=true",
                "checkpoint.interval=2",
                "checkpoint.keep=0",
                f"checkpoint.dir={ck}",
                "metrics.plot=true",
                f"runs_root={root}/runs",
                "name=tp2pp2",
            ],
        },  # fmt: skip
        {
            "name": "dp4_from_tp2_pp2",
            "dataset": dataset,
            "params": True,
            "resume": str(mid),
            "overrides": [*STEPS, "parallel.dp=4", "parallel.zero_stage=1", f"run_dir={root}/dp4"],
        },
        {
            "name": "tp2_pp2_from_tp2_pp2",
            "dataset": dataset,
            "resume": str(mid),
            "overrides": [*STEPS, "parallel.tp=2", "parallel.pp=2", "parallel.dp=1", f"run_dir={root}/same"],
        },
    ]
    results = spawn_trainers(8, cases)
    return {
        "root": root,
        "dataset": dataset,
        "ref": ref,
        "ref_params": ref_params,
        "ref_fp8": ref_fp8,
        "fp8_fqns": fp8_trainer.fp8_fqns,
        "results": results,
        "mid": mid,
    }


def _ranks(setup, name: str) -> list[dict]:
    out = []
    for rank, per_rank in enumerate(setup["results"]):
        r = per_rank[name]
        if r is None:
            continue
        assert "error" not in r, f"rank {rank}: {r['error']}"
        out.append(r)
    assert out, f"no rank ran {name}"
    return out


def _close(losses, ref_losses) -> bool:
    return len(losses) == len(ref_losses) and all(
        abs(a - b) <= TOL_LOSS * max(abs(b), 1.0) for a, b in zip(losses, ref_losses)
    )


def _check_params(params, ref_params) -> None:
    assert set(params) == set(ref_params)
    scale = max(v.abs().max().item() for v in ref_params.values())
    diff = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
    assert diff < TOL_PARAM * scale, f"largest parameter difference {diff}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_trainer_layout_matches_one_process(setup, name):
    ref = setup["ref"].losses
    for r in _ranks(setup, name):
        assert r["steps"] == [1, 2, 3, 4]
        assert _close(r["losses"], ref), f"{r['losses']} vs {ref}"
        _check_params(r["params"], setup["ref_params"])


@pytest.mark.parametrize("name", list(FP8_LAYOUTS))
def test_fp8_trainer_layout_matches_one_process_fp8(setup, name):
    ref, plain = setup["ref_fp8"].losses, setup["ref"].losses
    assert max(abs(a - b) for a, b in zip(ref, plain)) > 1e-4  # FP8 changes the one-process losses
    rows_only = name == "fp8_pp2_dp2"
    tol = TOL_LOSS_FP8_ROWS if rows_only else TOL_LOSS_FP8_TP
    for r in _ranks(setup, name):
        assert r["steps"] == [1, 2, 3, 4]
        assert (
            sorted(r["fp8_fqns"]) == sorted(setup["fp8_fqns"]) and len(r["fp8_fqns"]) == 4 * 7
        )  # all blocks
        assert all(0 < share < 1 for share in r["fp8_share"])
        diffs = [abs(a - b) / max(abs(b), 1.0) for a, b in zip(r["losses"], ref)]
        assert max(diffs) <= tol, f"{r['losses']} vs {ref}"
        if rows_only:
            assert diffs[0] <= TOL_LOSS, f"first step: {r['losses'][0]} vs {ref[0]}"


def test_checkpoint_reshards_tp2_pp2_to_dp4_and_one_process(setup):
    ref = setup["ref"].losses
    for r in _ranks(setup, "tp2_pp2_ckpt"):
        assert _close(r["losses"], ref), f"{r['losses']} vs {ref}"
    for r in _ranks(setup, "dp4_from_tp2_pp2"):
        assert r["steps"] == [3, 4] and _close(r["losses"], ref[2:]), f"{r['losses']} vs {ref[2:]}"
        _check_params(r["params"], setup["ref_params"])
    root = setup["root"]
    one = Trainer(
        build_job(setup["dataset"], *STEPS, f"run_dir={root}/one", "checkpoint.enabled=true"),
        resume=setup["mid"],
    ).run()
    assert [r["step"] for r in one.rows] == [3, 4] and _close(one.losses, ref[2:]), one.losses
    _check_params(ckpt.load_model_state(one.last_checkpoint), setup["ref_params"])


def test_same_layout_resume_is_bit_exact(setup):
    full = _ranks(setup, "tp2_pp2_ckpt")[0]["losses"]
    for r in _ranks(setup, "tp2_pp2_from_tp2_pp2"):
        assert r["losses"] == full[2:]


def test_run_level_files_come_from_rank_zero_only(setup):
    runs = list((setup["root"] / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tp2pp2-"), runs  # one folder, broadcast by rank 0
    assert all(r["run_dir"] == str(runs[0]) for r in _ranks(setup, "tp2_pp2_ckpt"))
    rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # not once per rank
    assert all(0 < r["mfu"] < 1 for r in rows)
    assert (runs[0] / "loss.png").stat().st_size > 1000 and (runs[0] / "config.json").is_file()
    ck = setup["mid"].parent
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    files = json.loads((setup["mid"] / ckpt.MANIFEST).read_text())["files"]
    assert {f"__{r}_0.distcp" for r in range(4)} <= set(files) and ".metadata" in files
    state = ckpt.read_train_state(setup["mid"])
    assert state["step"] == 2 and state["parallel"] == {"tp": 2, "cp": 1, "pp": 2, "dp": 1}
    ckpt.verify_checkpoint(setup["mid"])
