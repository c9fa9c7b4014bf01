"""A model to serve, from any checkpoint a user has.

`load_serving_model(path)` takes:
- a llama3hp checkpoint (a step folder, a checkpoints folder or a run folder) saved under any
  training layout: `llama3hp.train.checkpoint.load_checkpoint` reads it into the plain model, its
  SHA-256 manifest verified;
- a Hugging Face `LlamaForCausalLM` folder (config.json + safetensors), any config form
  transformers writes (`llama3hp.model.convert.load_hf`);
- a Meta consolidated checkpoint (params.json + consolidated.*.pth).

Then, in this order: the weights cast to the serving dtype (bf16 on a GPU, fp32 on CPU unless
told), tensor parallelism (`apply_tp` with a `TPComm` without sequence parallelism: a decode step
has one token per sequence), the move to the device (each rank keeps only its shards), and the
paper's FP8 serving recipe when asked (`llama3hp.fp8.inference.apply_fp8_inference`).

Limitation: under tensor parallelism every rank reads the whole checkpoint into host memory before
keeping its shards: one rank at a time for Hugging Face and Meta folders (the peak is one copy),
all ranks at once for a llama3hp checkpoint (DCP's load is a collective: tp copies at the peak).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from llama3hp.errors import MissingFileError
from llama3hp.model.args import ModelArgs
from llama3hp.model.llama import Transformer
from llama3hp.model.rope import rope_inv_freq

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checkpoint_format(path: str | Path) -> str:
    """ "hf", "meta" or "llama3hp" for a folder; MissingFileError when it is none of them."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"checkpoint not found: {p}")
    if (p / "config.json").is_file() and (
        any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()
    ):
        return "hf"
    if (p / "params.json").is_file():
        return "meta"
    return "llama3hp"


def _empty_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.inv_freq = rope_inv_freq(args)  # a non-persistent buffer: to_empty left it unset
    return model


def load_plain_model(path: str | Path, group: dist.ProcessGroup | None = None) -> Transformer:
    """The checkpoint at `path` (any of the three formats) as a plain fp32 model on the CPU.
    `group`: the ranks loading it together (a llama3hp checkpoint is read with a collective DCP
    load, its manifest hashed once on rank 0)."""
    fmt = checkpoint_format(path)
    if fmt == "llama3hp":
        from llama3hp.config import model_args_from_dict
        from llama3hp.train import checkpoint as ckpt

        meta = ckpt.read_train_state(path)
        if "model_args" not in meta:
            raise ckpt.CheckpointError(f"checkpoint {path} stores no model args")
        model = _empty_model(model_args_from_dict(meta["model_args"]))
        ckpt.load_checkpoint(path, model, group=group)
        return model
    from llama3hp.model.convert import load_hf, load_meta

    args, sd = (load_hf if fmt == "hf" else load_meta)(path)
    model = _empty_model(args)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on a GPU; fp32 on CPU, where bf16 matmuls are slow on most cores."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_serving_model(
    path: str | Path,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    activation_scale_ub: float | None = 1200.0,
    group: dist.ProcessGroup | None = None,
) -> Transformer:
    """The model to hand to `LLMEngine` (module docstring). `group`: the tensor-parallel group;
    every rank of it calls this."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    rank, size = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    if checkpoint_format(path) == "llama3hp":  # DCP loads collectively: every rank at once
        model = _prepare(load_plain_model(path, group), device, dtype, group)
    else:
        model = None
        for turn in range(size):  # one rank at a time holds the whole checkpoint in host memory
            if turn == rank:
                model = _prepare(load_plain_model(path), device, dtype, group)
            if group is not None:
                dist.barrier(group=group)
    assert model is not None
    if fp8:
        from llama3hp.fp8.inference import apply_fp8_inference, serving_fp8_config

        if not apply_fp8_inference(model, serving_fp8_config(activation_scale_ub)):
            import warnings

            warnings.warn("--fp8: no linear was converted (fewer than 3 blocks, or dims not multiples of 16)",
                          stacklevel=2)  # fmt: skip
    return model


def _prepare(model: Transformer, device: torch.device, dtype: torch.dtype, group) -> Transformer:
    inv_freq = model.inv_freq
    model = model.to(dtype)
    model.inv_freq = inv_freq  # RoPE angles stay fp32 (the kernels compute them in fp32)
    if group is not None and dist.get_world_size(group) > 1:
        from llama3hp.parallel.tensor import apply_tp
        from llama3hp.parallel.tp_comm import TPComm

        apply_tp(model, TPComm(group, sequence_parallel=False))
    model.to(device)
    model.requires_grad_(False)
    return model.eval()
