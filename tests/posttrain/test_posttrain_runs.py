"""SFT and DPO through the trainer and `llama3hp evaluate` on a shrunk Llama 3 (dim 64, 2 layers,
full vocabulary), one process: the objective picked by [posttrain], the reference's values
precomputed beside the data or co-resident, and the one-line errors of bad combinations."""

from __future__ import annotations

import json
import math

import pytest

from llama3hp.cli import main
from llama3hp.config import ConfigError, load_job_config
from llama3hp.data import DataError, prepare
from llama3hp.train import checkpoint as ckpt
from llama3hp.train.trainer import train
from tests.data.test_posttrain_data import PREF_ROWS, SFT_ROWS, _jsonl
from tests.train.train_testing import SMALL

pytestmark = pytest.mark.xdist_group("train_e2e")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posttrain")
    prepare([_jsonl(tmp / "sft.jsonl", SFT_ROWS * 6)], tmp / "sft", format="sft", workers=1)
    prepare([_jsonl(tmp / "pref.jsonl", PREF_ROWS * 6)], tmp / "pref", format="preference", workers=1)
    return tmp


def _job(tmp, *extra):
    return load_job_config("tiny", [*SMALL, f"runs_root={tmp}/runs", "training.seq_len=96", *extra])


@pytest.fixture(scope="module")
def sft_run(data):
    job = _job(data, f'data.datasets=["{data}/sft"]', "posttrain.objective=sft", "training.steps=2",
               f"run_dir={data}/sft_run")  # fmt: skip
    return train(job)


def test_sft_trains_the_responses(sft_run):
    assert len(sft_run.rows) == 2 and all(math.isfinite(r["loss"]) for r in sft_run.rows)
    assert sft_run.last_checkpoint is not None


def _dpo(data, init, *extra):
    return _job(data, f'data.datasets=["{data}/pref"]', "posttrain.objective=dpo", f"training.init_from={init}",
                "training.steps=2", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def dpo_pre(data, sft_run):
    """A DPO run with the reference precomputed: it writes the values file beside the data."""
    return train(_dpo(data, sft_run.last_checkpoint, f"run_dir={data}/dpo_pre"))


def test_dpo_precomputed_and_co_resident_agree(data, sft_run, dpo_pre):
    init = sft_run.last_checkpoint
    pre = dpo_pre
    files = list((data / "pref").glob("reference-*.json"))
    assert len(files) == 1  # two numbers per pair, beside the data
    values = json.loads(files[0].read_text())
    assert len(values["sample_ids"]) == 18 and values["checkpoint_sha256"]
    co = train(_dpo(data, init, f"run_dir={data}/dpo_co", "posttrain.reference_mode=co_resident"))
    for a, b in zip(pre.rows, co.rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    first = pre.rows[0]
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margin"] == 0.0
    for key in ("nll", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/accuracy"):
        assert key in first
    logged = [json.loads(x) for x in (data / "dpo_pre" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/margin" in logged[-1]


def test_dpo_refuses_values_of_another_reference(data, sft_run, dpo_pre, tmp_path):
    values = next((data / "pref").glob("reference-*.json"))
    other = json.loads(values.read_text())
    other["checkpoint_sha256"] = "0" * 64
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(DataError, match="computed for another checkpoint"):
        train(
            _dpo(data, sft_run.last_checkpoint, f"posttrain.reference_values={bad}", f"run_dir={tmp_path}/r")
        )


def test_bad_combinations_are_one_line_errors(data, sft_run, tmp_path):
    with pytest.raises(ConfigError, match="needs data prepared with --format preference"):
        train(_job(data, f'data.datasets=["{data}/sft"]', "posttrain.objective=dpo", f"run_dir={tmp_path}/a"))
    with pytest.raises(ConfigError, match="needs a reference model"):
        train(
            _job(data, f'data.datasets=["{data}/pref"]', "posttrain.objective=dpo", f"run_dir={tmp_path}/b")
        )
    # A reference of another architecture (the checkpoint has 2 layers, the config builds 3).
    with pytest.raises(ckpt.CheckpointError, match="different model|shape"):
        train(_dpo(data, sft_run.last_checkpoint, "model.n_layers=3", f"run_dir={tmp_path}/c",
                   "posttrain.reference_mode=co_resident"))  # fmt: skip


def _reward(data, init, *extra):
    return _job(data, f'data.datasets=["{data}/pref"]', "posttrain.objective=reward", "model.head=reward",
                f"training.init_from={init}", "training.steps=2", *extra)  # fmt: skip


def test_reward_model_starts_from_a_language_model_and_evaluates(data, sft_run, capsys):
    run = train(_reward(data, sft_run.last_checkpoint, f"run_dir={data}/reward"))
    assert "output.score not in" in capsys.readouterr().out  # only the head is new
    first = run.rows[0]
    assert math.isfinite(first["loss"])
    for key in ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert key in first
    sd = ckpt.load_model_state(run.last_checkpoint)
    assert tuple(sd["output.score"].shape) == (1, 64) and "output.weight" not in sd
    args = [*SMALL, "training.seq_len=96", "posttrain.objective=reward", "model.head=reward",
            f'posttrain.eval_datasets=["{data}/pref"]']  # fmt: skip
    assert main(["evaluate", "--config", "tiny", "--checkpoint", str(run.last_checkpoint), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    # 18 rows, 6 of them rankings edited > chosen > rejected: 6 x 3 + 12 ordered pairs.
    assert out["examples"] == 18 and out["count"] == 30 and 0.0 <= out["accuracy"] <= 1.0
    assert math.isfinite(out["rewards/chosen"]) and math.isfinite(out["rewards/rejected"])
    with pytest.raises(ConfigError, match="a reward model needs both"):
        train(_job(data, f'data.datasets=["{data}/pref"]', "posttrain.objective=reward", f"run_dir={data}/x"))


def test_evaluate_prints_the_held_out_metrics(data, sft_run, capsys):
    args = [
        *SMALL,
        "training.seq_len=96",
        "posttrain.objective=sft",
        f'posttrain.eval_datasets=["{data}/sft"]',
    ]
    assert main(["evaluate", "--config", "tiny", "--checkpoint", str(sft_run.last_checkpoint), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 12 and math.isfinite(out["response_loss"]) and out["count"] > 0


@pytest.mark.parametrize("size", ["tiny", "llama3_8b", "llama3_70b", "llama3_405b"])
def test_the_shipped_post_training_configs_load(size):
    if size == "tiny":
        reward = load_job_config("tiny_reward")
        assert reward.posttrain.objective == "reward" and reward.model.head == "reward"
    sft, dpo = load_job_config(f"{size}_sft"), load_job_config(f"{size}_dpo")
    assert sft.posttrain.objective == "sft" and dpo.posttrain.objective == "dpo"
    assert (dpo.posttrain.beta, dpo.posttrain.alpha) == (0.1, 0.2) and dpo.data.pack_pairs == "shared_prompt"
    if size != "tiny":
        assert dpo.training.lr == 1e-5  # the paper's
