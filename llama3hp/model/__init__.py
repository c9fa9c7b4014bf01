"""The Llama 3 architecture (plain PyTorch; parallelism is applied from outside)."""

from llama3hp.model.args import PRESETS, KernelConfig, ModelArgs, get_model_args
from llama3hp.model.llama import Transformer, document_positions
from llama3hp.model.rope import rope_inv_freq

__all__ = [
    "PRESETS",
    "KernelConfig",
    "ModelArgs",
    "Transformer",
    "document_positions",
    "get_model_args",
    "rope_inv_freq",
]
