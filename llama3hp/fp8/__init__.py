"""FP8 training: recipes that run the transformer blocks' linears on FP8 tensor cores.

    from llama3hp.fp8 import Fp8Config, apply_fp8
    converted = apply_fp8(model, Fp8Config(recipe="rowwise"))   # FQNs of the linears now in FP8

Recipes: "none" (off), "rowwise" (dynamic per-row scales, Triton/CUDA quantization, torch._scaled_mm),
"emulated" (the same math through torch's float8 dtypes and fp32 matmuls, any device),
"te_delayed" / "te_current" (Transformer Engine, when it imports). `fp8_mfu` reports throughput
against the bf16, FP8 and mixed peaks. Serving: `apply_fp8_inference` (inference.py), the paper's
row-wise FP8 in the inner blocks' feed-forward linears, weights quantized once at load.
"""

from llama3hp.fp8.config import BLOCK_LINEARS, RECIPES, Fp8Config
from llama3hp.fp8.convert import apply_fp8, fp8_linear_names, select_fp8_linears
from llama3hp.fp8.inference import Fp8InferenceLinear, apply_fp8_inference, serving_fp8_config
from llama3hp.fp8.linear import Fp8Gemms, Fp8Linear, Fp8LinearFunction
from llama3hp.fp8.mfu import Fp8Mfu, fp8_flops_per_token, fp8_flops_share, fp8_mfu
from llama3hp.fp8.te import build_te_recipe, te_autocast, te_available

__all__ = [
    "BLOCK_LINEARS",
    "RECIPES",
    "Fp8Config",
    "Fp8Gemms",
    "Fp8InferenceLinear",
    "Fp8Linear",
    "Fp8LinearFunction",
    "Fp8Mfu",
    "apply_fp8",
    "apply_fp8_inference",
    "build_te_recipe",
    "fp8_flops_per_token",
    "fp8_flops_share",
    "fp8_linear_names",
    "fp8_mfu",
    "select_fp8_linears",
    "serving_fp8_config",
    "te_autocast",
    "te_available",
]
