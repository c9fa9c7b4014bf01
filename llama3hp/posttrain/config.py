"""What a run optimises beyond pre-training: TOML section [posttrain]."""

from __future__ import annotations

from dataclasses import dataclass, field

from llama3hp.errors import ConfigError
from llama3hp.posttrain.dpo import PAPER_ALPHA, PAPER_BETA

OBJECTIVES = ("next_token", "sft", "dpo")
REFERENCE_MODES = ("precomputed", "co_resident")


@dataclass
class PostTrainConfig:
    """The objective and, for DPO, its reference model."""

    # "next_token": pre-training; "sft": cross-entropy of the response tokens only (data prepared
    # with --format sft); "dpo": the paper's DPO (data prepared with --format preference).
    objective: str = "next_token"
    beta: float = PAPER_BETA  # DPO: scale of the log-probability ratios
    alpha: float = PAPER_ALPHA  # DPO: weight of the chosen response's per-token NLL
    mask_format_tokens: bool = True  # DPO: leave headers and <|eot_id|> out of the log-probability sums
    reference: str = ""  # DPO: the frozen reference checkpoint ("" = training.init_from, the policy's start)
    # DPO: "precomputed": one forward pass of the reference over the data writes two numbers per pair
    # beside it (reused by later runs) and the reference is freed; "co_resident": the reference is
    # sharded on the policy's layout and runs forward on every step's batches (no pass, 1/3 more FLOPs).
    reference_mode: str = "precomputed"
    reference_values: str = ""  # precomputed values file ("" = in the first dataset's folder, by hash)
    eval_datasets: list[str] = field(default_factory=list)  # held-out sets for `llama3hp evaluate`

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"posttrain.objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'"
            )
        if self.reference_mode not in REFERENCE_MODES:
            raise ConfigError(
                f"posttrain.reference_mode must be one of {', '.join(REFERENCE_MODES)}, got '{self.reference_mode}'"
            )
        if self.beta <= 0 or self.alpha < 0:
            raise ConfigError(
                f"posttrain.beta must be > 0 and posttrain.alpha >= 0, got {self.beta}, {self.alpha}"
            )
