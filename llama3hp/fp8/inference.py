"""FP8 serving as the Llama 3 paper does it: row-wise E4M3 in the feed-forward linears only.

- which linears: w1, w3 and w2 of every Transformer block except the first and the last;
  attention, the embedding and the head stay in the serving dtype (bf16 on a GPU);
- weights: quantized ONCE, when the model is converted, per output channel (a row of W [N, K]);
- activations: quantized per token on every call, the amax bounded above by
  `Fp8Config.activation_scale_ub` (1200 by default, the paper's bound: a token whose |x| exceeds
  it saturates at ±448 instead of stretching its scale and losing every other value's resolution);
- GEMM: `torch._scaled_mm` with row-wise scales on sm89+ (H100/H200), the fp32 emulation of
  `llama3hp.kernels.fp8_gemm` elsewhere (CPU), picked by the same `gemm_rowwise` as training.

`apply_fp8_inference(model)` swaps the chosen nn.Linear modules for `Fp8InferenceLinear` in place,
from outside the model, like `apply_fp8` does for training. w1 and w3 are quantized into
consecutive rows of one buffer, so the FFN still runs them as ONE GEMM over one quantization of x
(`llama3hp.model.grouped.grouped_linear`).

Shape legend: M tokens, K in_features, N out_features.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from llama3hp.fp8.config import Fp8Config
from llama3hp.fp8.convert import select_fp8_linears
from llama3hp.fp8.linear import gemm_rowwise, quantize_rows

# The paper's serving recipe as an Fp8Config: the FFN linears of the inner blocks, E4M3 forward,
# per-token activation scales bounded by 1200.
FFN_PATTERNS = ("layers.*.feed_forward.w1", "layers.*.feed_forward.w2", "layers.*.feed_forward.w3")


def serving_fp8_config(activation_scale_ub: float | None = 1200.0, **changes) -> Fp8Config:
    """The paper's FP8 serving recipe (module docstring); `changes` override other Fp8Config fields
    (e.g. gemm="torch" to force the emulated GEMM)."""
    return Fp8Config(
        recipe="rowwise", include=FFN_PATTERNS, skip_first_last_blocks=True,
        activation_scale_ub=activation_scale_ub, **changes,
    ).validate()  # fmt: skip


class Fp8InferenceLinear(nn.Module):
    """y = x W^T with W stored in FP8 (E4M3, one scale per output channel, computed once) and x
    quantized per token on each call. Inference only: no gradient flows through it.

    Buffers: `weight` fp8 [N, K] and `weight_scale_inv` fp32 [N] (the dequantization scales)."""

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, config: Fp8Config):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", weight_scale_inv)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.fp8_config = config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config) -> Fp8InferenceLinear:
        if linear.bias is not None:
            raise ValueError("FP8 serving takes bias-free linears (Llama has none)")
        with torch.no_grad():
            q, s = quantize_rows(linear.weight.detach(), config.fwd_torch_dtype, None, config)
        return cls(q, s.float(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        return fp8_inference_gemm(x, self.weight, self.weight_scale_inv, self.fp8_config)

    def extra_repr(self) -> str:
        c = self.fp8_config
        return (
            f"in={self.in_features}, out={self.out_features}, ub={c.activation_scale_ub}, gemm={c.gemm_impl}"
        )


def fp8_inference_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale_inv: torch.Tensor, cfg: Fp8Config):
    """x [..., K] @ dequant(wq [N, K])^T with x quantized per token (bounded by the config's
    activation_scale_ub) -> [..., N] in x's dtype (bf16 for an fp32 x on a GPU is not done here: the
    serving model runs in one dtype)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xq, sx = quantize_rows(x2, cfg.fwd_torch_dtype, cfg.activation_scale_ub, cfg)
        y = gemm_rowwise(xq, wq, sx, w_scale_inv, x.dtype, cfg)
    return y.view(*x.shape[:-1], wq.shape[0])


def apply_fp8_inference(model: nn.Module, config: Fp8Config | None = None) -> list[str]:
    """Swap the linears `config` selects (default: `serving_fp8_config()`, the paper's recipe) for
    `Fp8InferenceLinear` in place; returns their FQNs. Under "rowwise" a linear whose dims are not
    multiples of 16 stays as it is (torch._scaled_mm needs 16-aligned dims)."""
    config = config or serving_fp8_config()
    fqns = []
    for fqn in select_fp8_linears(model, config):
        lin = cast(nn.Linear, model.get_submodule(fqn))
        if config.recipe == "rowwise" and (lin.in_features % 16 or lin.out_features % 16):
            continue
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Fp8InferenceLinear.from_linear(lin, config))
        fqns.append(fqn)
    _pack_ffn_inputs(model, set(fqns))
    return fqns


def _pack_ffn_inputs(model: nn.Module, converted: set[str]) -> None:
    """w1 and w3 of each converted FFN into consecutive rows of one buffer (weights and scales)."""
    from llama3hp.model.grouped import pack_rows_

    for name, mod in model.named_modules():
        if {f"{name}.w1", f"{name}.w3"} <= converted:
            pair = [mod.get_submodule("w1"), mod.get_submodule("w3")]
            pack_rows_(pair, "weight")
            pack_rows_(pair, "weight_scale_inv")


def fp8_inference_names(model: nn.Module) -> list[str]:
    """FQNs of the modules of `model` that serve in FP8, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, Fp8InferenceLinear)]
