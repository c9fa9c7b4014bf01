"""FP8 in the trainer: the [fp8] section, conversion at build time, loss parity, FP8 metrics columns."""

import json
import math

import pytest
import torch
import train_testing

from llama3hp.config import ConfigError, load_job_config
from llama3hp.fp8 import Fp8Linear
from llama3hp.parallel import ParallelContext
from llama3hp.train import build
from llama3hp.train import metrics as M
from llama3hp.train import trainer as T

pytestmark = pytest.mark.xdist_group("train_fp8")

SMALL = [*train_testing.SMALL, "training.steps=30", "metrics.plot=false", "checkpoint.enabled=false"]
BLOCK_LINEARS = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


def _job(tmp_path, dataset, recipe):
    return load_job_config(
        "tiny",
        [*SMALL, f'data.datasets=["{dataset}"]', f"run_dir={tmp_path}/{recipe}", f"fp8.recipe={recipe}"],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    """30 steps of the shrunk model in fp32 and with the row-wise FP8 recipe (emulated GEMM on CPU)."""
    tmp = tmp_path_factory.mktemp("fp8runs")
    out = {}
    for recipe in ("none", "rowwise"):
        trainer = T.Trainer(_job(tmp, small_dataset, recipe))
        modules = dict(trainer.model.chunks[0].named_modules())
        out[recipe] = (trainer, modules, trainer.run())
    return out


def test_fp8_section_parses_and_validates():
    job = load_job_config(
        "tiny", ["fp8.recipe=rowwise", 'fp8.exclude=["layers.0.*"]', "fp8.activation_scale_ub=none"]
    )
    assert job.fp8.enabled and job.fp8.exclude == ("layers.0.*",) and job.fp8.activation_scale_ub is None
    assert not load_job_config("tiny").fp8.enabled  # off by default
    assert load_job_config("llama3_1b_fp8").fp8.recipe == "rowwise"
    bad = {
        "fp8.recipe=rowwize": "fp8.recipe 'rowwize' unknown",
        "fp8.recpe=rowwise": "did you mean 'fp8.recipe'",
        "fp8.grad_dtype=e3m4": "fp8.grad_dtype 'e3m4' unknown",
        "fp8.amax_history_len=0": "amax_history_len must be >= 1",
    }
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg) as e:
            load_job_config("tiny", [override])
        assert "\n" not in str(e.value)
    load_job_config("tiny", ["fp8.recipe=rowwise", "parallel.tp=2"])  # native FP8 is TP-aware
    with pytest.raises(ConfigError, match="te_delayed with tp=2, cp=1, pp=1: Transformer Engine recipes run"):
        load_job_config("tiny", ["fp8.recipe=te_delayed", "parallel.tp=2"])


def test_fp8_device_and_layout_checks(monkeypatch):
    job = load_job_config("tiny", ["fp8.recipe=rowwise"])
    build.check_fp8(job, ParallelContext(), torch.device("cpu"))  # emulated GEMM on CPU: fine
    # An sm80 GPU (A100) has no FP8 tensor cores.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match="needs FP8 tensor cores .* sm80: use fp8.recipe=emulated"):
        build.check_fp8(job, ParallelContext(), torch.device("cuda"))
    # A mesh (here a DP2 layout): native FP8 runs there (tests/train/test_parallel_trainer.py); TE
    # recipes are refused.
    dp2 = ParallelContext(rank=0, world_size=2, dp_rank=0, dp_size=2, mesh=object())
    build.check_fp8(job, dp2, torch.device("cpu"))
    build.check_fp8(load_job_config("tiny"), dp2, torch.device("cpu"))  # FP8 off: nothing to check
    from llama3hp.fp8 import te

    monkeypatch.setattr(te, "te_available", lambda: True)
    with pytest.raises(
        ConfigError, match="te_current on a 2-rank mesh: Transformer Engine recipes run on one"
    ):
        build.check_fp8(load_job_config("tiny", ["fp8.recipe=te_current"]), dp2, torch.device("cuda"))
    monkeypatch.setattr(te, "te_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"needs Transformer Engine: pip install 'transformer-engine\[pytorch\]'"
    ):
        build.check_fp8(
            load_job_config("tiny", ["fp8.recipe=te_delayed"]), ParallelContext(), torch.device("cpu")
        )


def test_trainer_converts_exactly_the_block_linears(runs):
    trainer, modules, _ = runs["rowwise"]
    fp8 = {name for name, m in modules.items() if isinstance(m, Fp8Linear)}
    expected = {
        f"layers.{i}.{part}.{w}"
        for i in range(2)
        for part, names in (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")))
        for w in names
    }
    assert fp8 == expected and set(trainer.fp8_fqns) == expected
    assert not isinstance(modules["output"], Fp8Linear)
    assert isinstance(modules["tok_embeddings"], torch.nn.Embedding)
    base, _, _ = runs["none"]
    assert base.fp8_fqns == [] and not any(isinstance(m, Fp8Linear) for m in runs["none"][1].values())
    # Same Parameters and names: the state dict and the optimizer see no change.
    assert list(trainer.model.chunks[0].state_dict()) == list(base.model.chunks[0].state_dict())


def test_fp8_loss_tracks_the_fp32_run(runs):
    ref = runs["none"][2].losses
    fp8 = runs["rowwise"][2].losses
    assert len(ref) == len(fp8) == 30 and all(math.isfinite(x) for x in fp8)
    assert ref[-1] < ref[0] - 1.0  # it trained
    assert fp8 != ref  # FP8 actually ran (quantization changes the numbers)
    last_ref, last_fp8 = sum(ref[-5:]) / 5, sum(fp8[-5:]) / 5
    assert abs(last_fp8 - last_ref) / last_ref < 0.02


def test_metrics_rows_carry_fp8_fields(runs):
    _, _, result = runs["rowwise"]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    for r in rows:
        assert r["fp8_recipe"] == "rowwise"
        assert 0 < r["fp8_share"] < 1
        assert r["model_tflops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
        assert r["mfu_bf16"] == pytest.approx(r["mfu"])
        # CPU: emulated FP8 on the fp32 units, so the FP8 and mixed peaks equal the measured one.
        assert r["mfu_fp8"] == pytest.approx(r["mfu"]) and r["mfu_mixed"] == pytest.approx(r["mfu"])
    base = [json.loads(line) for line in (runs["none"][2].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("fp8_share" in r for r in base)


def test_fp8_peaks_and_mixed_mfu_formula():
    assert M.gpu_fp8_peak_flops("NVIDIA H100 80GB HBM3") == 1979e12
    assert M.gpu_fp8_peak_flops("NVIDIA H200") == 1979e12
    assert M.gpu_fp8_peak_flops("NVIDIA A100-SXM4-80GB") is None
    # 10 GFLOP/token, 7 of them in FP8, 40,000 tok/s on an H100: 400 TFLOP/s achieved.
    f = M.fp8_fields(40_000.0, 10e9, 7e9, 989e12, 1979e12)
    assert f["model_tflops"] == pytest.approx(400.0) and f["fp8_share"] == pytest.approx(0.7)
    assert f["mfu_bf16"] == pytest.approx(400 / 989) and f["mfu_fp8"] == pytest.approx(400 / 1979)
    p_mixed = 1 / (0.3 / 989e12 + 0.7 / 1979e12)
    assert f["mfu_mixed"] == pytest.approx(400e12 / p_mixed)
    # Two devices: the per-device rate is what meets the per-device peak.
    assert M.fp8_fields(80_000.0, 10e9, 7e9, 989e12, 1979e12, n_devices=2)["mfu_mixed"] == pytest.approx(
        f["mfu_mixed"]
    )
    # No FP8 peak (A100): the FP8 MFUs are left out with the reason.
    a100 = M.fp8_fields(40_000.0, 10e9, 7e9, 312e12, None, note="A100: no FP8")
    assert "mfu_fp8" not in a100 and "mfu_mixed" not in a100 and a100["fp8_mfu_note"] == "A100: no FP8"
    peak, note = M.fp8_peak_flops(torch.device("cpu"), 5e11)
    assert peak == 5e11 and "emulated" in note
    assert M.fp8_peak_flops(torch.device("cpu"), 5e11, override=7e11)[0] == 7e11
