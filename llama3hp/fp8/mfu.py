"""FP8-aware MFU: what FP8 bought, measured against the right peak.

With a share s of the model FLOPs running on FP8 tensor cores (peak P8) and the rest on bf16
(peak P16), the fastest the step could possibly run is W (1 - s) / P16 + W s / P8 seconds for W
FLOPs, so the peak the run should be compared with is the time-weighted (harmonic) mix

    P_mixed = 1 / ((1 - s) / P16 + s / P8)

and MFU_mixed = achieved / P_mixed. (An arithmetic mix (1 - s) P16 + s P8 would overstate the
reachable peak: the bf16 part takes its time whatever the FP8 part does.) MFU against P16 alone
says how the run compares with a bf16 run (it can exceed 100% of what bf16 allows); MFU against P8
alone is the lower bound if everything could have run in FP8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llama3hp.fp8.config import Fp8Config
from llama3hp.model.flops import flops_per_token


@dataclass
class Fp8Mfu:
    model_tflops: float  # achieved model TFLOP/s (per device)
    fp8_share: float  # share of the model FLOPs that ran in FP8
    mfu_bf16: float  # achieved / bf16 peak
    mfu_fp8: float  # achieved / fp8 peak
    peak_mixed_tflops: float  # 1 / ((1 - s) / P16 + s / P8)
    mfu_mixed: float  # achieved / mixed peak


def fp8_mfu(
    model_flops_per_token: float,
    fp8_flops_per_token: float,
    tokens_per_s: float,
    peak_bf16: float,
    peak_fp8: float,
) -> Fp8Mfu:
    """MFU of a mixed bf16/FP8 run. Peaks in FLOP/s (e.g. 989e12 and 1979e12 for a dense H100 SXM)."""
    if model_flops_per_token <= 0 or tokens_per_s < 0 or peak_bf16 <= 0 or peak_fp8 <= 0:
        raise ValueError("fp8_mfu needs positive FLOPs per token and peaks, and a non-negative tokens/s")
    if not 0 <= fp8_flops_per_token <= model_flops_per_token:
        raise ValueError(
            f"fp8_flops_per_token ({fp8_flops_per_token:.4g}) must lie in [0, model_flops_per_token "
            f"({model_flops_per_token:.4g})]"
        )
    achieved = model_flops_per_token * tokens_per_s
    s = fp8_flops_per_token / model_flops_per_token
    peak_mixed = 1.0 / ((1.0 - s) / peak_bf16 + s / peak_fp8)
    return Fp8Mfu(
        model_tflops=achieved / 1e12,
        fp8_share=s,
        mfu_bf16=achieved / peak_bf16,
        mfu_fp8=achieved / peak_fp8,
        peak_mixed_tflops=peak_mixed / 1e12,
        mfu_mixed=achieved / peak_mixed,
    )


def fp8_flops_per_token(args, config: Fp8Config | None = None, fqns: list[str] | None = None) -> float:
    """Training FLOPs per token (6 per parameter: forward + two backward GEMMs) of the FP8 linears.

    The linears are those `config` selects in a model built from `args` (on the meta device, so any
    size is free), or the given `fqns` (e.g. the list apply_fp8 returned).
    """
    from llama3hp.fp8.convert import select_fp8_linears
    from llama3hp.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    names = select_fp8_linears(model, config or Fp8Config()) if fqns is None else fqns
    params = 0
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model")
        params += mod.weight.numel()
    return 6.0 * params


def fp8_flops_share(args, seq_len: int, doc_lens=None, config: Fp8Config | None = None, fqns=None) -> float:
    """Share of the model's training FLOPs per token (llama3hp.model.flops) that run in FP8."""
    return fp8_flops_per_token(args, config, fqns) / flops_per_token(args, seq_len, doc_lens)
