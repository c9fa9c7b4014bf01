"""The Llama 3 architecture (plain PyTorch; parallelism is applied from outside)."""

from llama3hp.model.args import PRESETS, KernelConfig, ModelArgs, get_model_args
from llama3hp.model.head import HeadOutput, OutputHead, RewardHead
from llama3hp.model.llama import Transformer, init_parameter
from llama3hp.model.rope import document_positions, rope_inv_freq

__all__ = [
    "PRESETS",
    "HeadOutput",
    "KernelConfig",
    "ModelArgs",
    "OutputHead",
    "RewardHead",
    "Transformer",
    "document_positions",
    "get_model_args",
    "init_parameter",
    "rope_inv_freq",
]
