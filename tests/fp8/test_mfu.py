"""FP8-aware MFU and the FP8 share of the model FLOPs."""

import pytest

from llama3hp.fp8 import Fp8Config, fp8_flops_per_token, fp8_flops_share, fp8_mfu
from llama3hp.model import get_model_args
from llama3hp.model.flops import block_matmul_params, flops_per_token


def test_fp8_mfu_formula():
    # 100 GFLOP/token, 60% of it in FP8, 4,000 tokens/s on peaks of 1000 and 2000 TFLOP/s.
    m = fp8_mfu(100e9, 60e9, 4000.0, 1000e12, 2000e12)
    assert m.model_tflops == pytest.approx(400.0)
    assert m.fp8_share == pytest.approx(0.6)
    assert m.mfu_bf16 == pytest.approx(0.4) and m.mfu_fp8 == pytest.approx(0.2)
    # Time-weighted peak: 1 / (0.4 / 1000 + 0.6 / 2000) = 1428.57 TFLOP/s.
    assert m.peak_mixed_tflops == pytest.approx(1e3 / 0.7)
    assert m.mfu_mixed == pytest.approx(0.28)
    # All-bf16 and all-FP8 runs reduce to the plain MFUs.
    assert fp8_mfu(100e9, 0.0, 4000.0, 1000e12, 2000e12).mfu_mixed == pytest.approx(0.4)
    assert fp8_mfu(100e9, 100e9, 4000.0, 1000e12, 2000e12).mfu_mixed == pytest.approx(0.2)


def test_fp8_mfu_rejects_bad_input():
    with pytest.raises(ValueError, match="must lie in"):
        fp8_mfu(100e9, 120e9, 1.0, 1e15, 2e15)
    with pytest.raises(ValueError, match="positive"):
        fp8_mfu(100e9, 10e9, 1.0, 0.0, 2e15)


def test_fp8_share_of_llama3_8b():
    args = get_model_args("llama3_8b")
    fp8 = fp8_flops_per_token(args)
    assert fp8 == 6 * args.n_layers * block_matmul_params(args)
    share = fp8_flops_share(args, 8192)
    assert share == pytest.approx(fp8 / flops_per_token(args, 8192))
    assert 0.6 < share < 0.95  # the head and attention scores stay in bf16
    skipped = fp8_flops_per_token(args, Fp8Config(skip_first_last_blocks=True))
    assert skipped == pytest.approx(fp8 * (args.n_layers - 2) / args.n_layers)
    ffn_only = fp8_flops_per_token(args, Fp8Config(include=("layers.*.feed_forward.*",)))
    assert ffn_only == 6 * args.n_layers * 3 * args.dim * args.ffn_dim
    assert fp8_flops_per_token(args, fqns=["layers.0.attention.wq"]) == 6 * args.dim * args.dim
