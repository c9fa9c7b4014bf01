import json

import pytest
import torch

from llama3hp.model import get_model_args
from llama3hp.model.flops import flops_per_token
from llama3hp.train import metrics as M


def test_gpu_peak_table():
    assert M.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert M.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert M.gpu_peak_flops("NVIDIA H200") == 989e12
    assert M.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert M.gpu_peak_flops("Tesla T4") is None


def test_mfu_matches_the_papers_405b_point():
    # The paper's 405B at 8K: 430 TFLOP/s per GPU is 43% of the H100's 989 TFLOP/s; tokens/s
    # per GPU that deliver 430 TFLOP/s give that MFU back whatever flops/token is.
    args = get_model_args("llama3_405b")
    fpt = flops_per_token(args, 8192)
    assert 6 * 405e9 < fpt < 6 * 420e9 + 12 * 126 * 16384 * 8192
    tok_s = 430e12 / fpt * 8192  # over 8,192 GPUs
    assert M.mfu(tok_s, fpt, 989e12, n_devices=8192) == pytest.approx(430 / 989)


def test_mfu_uses_document_lengths():
    args = get_model_args("tiny")
    one_doc = flops_per_token(args, 256, [256])
    short_docs = flops_per_token(args, 256, [64] * 4)
    assert short_docs < one_doc  # fewer attended pairs under the document mask
    assert M.doc_lengths(torch.tensor([0, 64, 128, 192, 256], dtype=torch.int32)) == [64] * 4


def test_cpu_peak_is_measured_and_positive():
    peak, measured = M.peak_flops(torch.device("cpu"))
    assert 1e8 < peak < 1e14 and measured
    assert M.peak_flops(torch.device("cpu"), override=5e12) == (5e12, False)


def test_logger_writes_rows_and_plot(tmp_path):
    log = M.MetricsLogger(tmp_path, jsonl=True, tensorboard=False)
    for step in range(1, 6):
        log.log(
            {
                "step": step,
                "loss": 10.0 / step,
                "tokens": 10,
                "tokens_seen": 10 * step,
                "step_time_s": 0.1,
                "mfu": 0.01,
                "peak_mem_gib": 0.5,
            }
        )
    log.close()
    rows = M.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 10.0
    M.plot_loss(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 steps" in M.format_summary(rows, 1.0)


def test_smoothing_is_bias_corrected():
    assert M.smoothed([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert M.smoothed([0.0, 1.0])[-1] == pytest.approx(0.1 * 1.0 / (1 - 0.81))
    assert M.peak_memory_bytes(torch.device("cpu")) > 0
