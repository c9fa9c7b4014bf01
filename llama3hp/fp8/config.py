"""FP8 training configuration: which recipe, which linears, which formats."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# "none" turns FP8 off (the trainer's default, `JobConfig.fp8`); the others are described at `recipe`.
RECIPES = ("none", "rowwise", "emulated", "te_delayed", "te_current")
QUANT_BACKENDS = ("auto", "triton", "torch", "cuda")
GEMM_BACKENDS = ("auto", "scaled_mm", "triton", "torch")
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
TE_FORMATS = ("hybrid", "e4m3")
# The linears of a Llama block, as FQN suffixes; the output head is called through F.linear on its
# weight and the embedding is a lookup, so neither is ever an nn.Linear that could be converted.
BLOCK_LINEARS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)

# How tensor parallelism splits each block linear (Megatron's split, `llama3hp.parallel.tensor`):
# "column" shards the output features, "row" the input features.
TP_SPLIT = {
    "attention.wq": "column",
    "attention.wk": "column",
    "attention.wv": "column",
    "attention.wo": "row",
    "feed_forward.w1": "column",
    "feed_forward.w3": "column",
    "feed_forward.w2": "row",
}


def tp_split(fqn: str, modes: dict[str, str] = TP_SPLIT) -> str | None:
    """How tensor parallelism splits the linear at `fqn` ("column", "row"), None if it is not a block linear."""
    return next((m for suffix, m in modes.items() if fqn.endswith(suffix)), None)


@dataclass
class Fp8Config:
    """How `apply_fp8` converts a model. Defaults: every linear of the transformer blocks in FP8
    (row-wise dynamic scaling, E4M3), attention math, embedding and output head in bf16."""

    # "none": no FP8 (apply_fp8 converts nothing);
    # "rowwise": dynamic per-row scales, Triton quantization, torch._scaled_mm (emulated GEMM off sm89+);
    # "emulated": the same math through torch's float8 dtypes and fp32 matmuls (CPU tests);
    # "te_delayed" / "te_current": Transformer Engine modules under fp8_autocast.
    recipe: str = "rowwise"
    # fnmatch patterns over nn.Linear FQNs: converted if any include matches and no exclude does.
    include: tuple[str, ...] = ("layers.*",)
    exclude: tuple[str, ...] = ()
    # Keep the first and last transformer blocks in bf16 (the paper's FP8 inference recipe).
    skip_first_last_blocks: bool = False
    # Upper bound on the per-token activation amax (the paper's 1200): clamps amax before
    # scale = fp8_max / amax, so larger activations saturate. None: unbounded. Not applied to
    # weights or gradients.
    activation_scale_ub: float | None = 1200.0
    fwd_dtype: str = "e4m3"  # activations and weights
    # Gradients: E4M3 by default because the CUTLASS row-wise _scaled_mm accepts only E4M3 operands;
    # "e5m2" gives the hybrid recipe's range (the Triton and emulated GEMMs take it).
    grad_dtype: str = "e4m3"
    quant_backend: str = "auto"  # "auto" (Triton on CUDA, reference elsewhere), "triton", "torch", "cuda"
    gemm: str = "auto"  # "auto" (_scaled_mm on sm89+, else emulated), "scaled_mm", "triton", "torch"
    # Raise ValueError on inf/NaN in a GEMM operand (one device sync per quantization). Off: the
    # row's dequant scale is NaN, so the GEMM output and the loss become NaN without a sync.
    check_finite: bool = False
    # Transformer Engine recipes only.
    te_format: str = "hybrid"  # "hybrid" (E4M3 forward, E5M2 backward) or "e4m3"
    amax_history_len: int = 1024  # te_delayed: window of past amaxes the scale is computed from
    amax_compute_algo: str = "max"  # te_delayed: "max" or "most_recent" over that window
    margin: int = 0  # te_delayed: scale = fp8_max / amax / 2**margin

    def validate(self) -> Fp8Config:
        checks = [
            (self.recipe in RECIPES, f"fp8.recipe {self.recipe!r} unknown: use one of {', '.join(RECIPES)}"),
            (
                self.quant_backend in QUANT_BACKENDS,
                f"fp8.quant_backend {self.quant_backend!r} unknown: use one of {', '.join(QUANT_BACKENDS)}",
            ),
            (
                self.gemm in GEMM_BACKENDS,
                f"fp8.gemm {self.gemm!r} unknown: use one of {', '.join(GEMM_BACKENDS)}",
            ),
            (self.fwd_dtype in FP8_FORMATS, f"fp8.fwd_dtype {self.fwd_dtype!r} unknown: use e4m3 or e5m2"),
            (self.grad_dtype in FP8_FORMATS, f"fp8.grad_dtype {self.grad_dtype!r} unknown: use e4m3 or e5m2"),
            (
                self.activation_scale_ub is None or self.activation_scale_ub > 0,
                f"fp8.activation_scale_ub must be positive or None, got {self.activation_scale_ub}",
            ),
            (self.te_format in TE_FORMATS, f"fp8.te_format {self.te_format!r} unknown: use hybrid or e4m3"),
            (self.amax_history_len >= 1, f"fp8.amax_history_len must be >= 1, got {self.amax_history_len}"),
            (
                self.amax_compute_algo in ("max", "most_recent"),
                f"fp8.amax_compute_algo {self.amax_compute_algo!r} unknown: use max or most_recent",
            ),
            (
                isinstance(self.include, tuple | list) and isinstance(self.exclude, tuple | list),
                "fp8.include and fp8.exclude must be tuples of fnmatch patterns",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self

    def check_device(self, device: torch.device) -> Fp8Config:
        """Raise a one-line ValueError when this recipe cannot run on `device` (naming the fix).

        "rowwise" needs FP8 tensor cores (sm89+: Ada, Hopper, Blackwell) on CUDA; on CPU it runs the
        emulated GEMM, which is what the tests use. TE recipes need transformer_engine and a GPU.
        """
        self.validate()
        if self.recipe == "rowwise" and device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 9):
                name = torch.cuda.get_device_name(device)
                raise ValueError(
                    f"fp8.recipe=rowwise needs FP8 tensor cores (sm89+: L40S, H100, H200) but {name} is "
                    f"sm{cap[0]}{cap[1]}: use fp8.recipe=emulated (slow, for checks) or fp8.recipe=none"
                )
        if self.uses_te:
            from llama3hp.fp8.te import te_available

            if not te_available():
                raise ValueError(
                    f"fp8.recipe={self.recipe} needs Transformer Engine: pip install "
                    "'transformer-engine[pytorch]', or use fp8.recipe=rowwise"
                )
            if device.type != "cuda":
                raise ValueError(f"fp8.recipe={self.recipe} runs on CUDA only: use fp8.recipe=rowwise on CPU")
        return self

    @property
    def enabled(self) -> bool:
        return self.recipe != "none"

    @property
    def fwd_torch_dtype(self) -> torch.dtype:
        return FP8_FORMATS[self.fwd_dtype]

    @property
    def grad_torch_dtype(self) -> torch.dtype:
        return FP8_FORMATS[self.grad_dtype]

    @property
    def quant_impl(self) -> str:
        """The quantization backend that runs: the emulated recipe always uses the torch reference."""
        return "torch" if self.recipe == "emulated" else self.quant_backend

    @property
    def gemm_impl(self) -> str:
        """The GEMM setting that applies: the emulated recipe always runs the fp32 emulation."""
        return "torch" if self.recipe == "emulated" else self.gemm

    @property
    def uses_te(self) -> bool:
        return self.recipe.startswith("te_")

    def replace(self, **changes) -> Fp8Config:
        return dataclasses.replace(self, **changes).validate()
