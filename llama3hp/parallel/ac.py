"""Activation checkpointing, applied to a built model from outside (`apply_ac`), like TP and ZeRO.

A checkpointed transformer block keeps only its input for backward: its activations (~34 s·b·D
bytes per block in Korthikanti's count) are recomputed by re-running its forward when backward
first needs one, for about a third more block FLOPs. Non-reentrant `torch.utils.checkpoint`: the
recompute runs under the forward's autocast state, collectives included, and the block has no
randomness, so no RNG state is stashed.

`apply_ac` replaces the chosen blocks' `forward` on the instance: the module tree, the parameter
names and every hook on the block (ZeRO-3 gathers parameters in a forward pre-hook and a backward
pre-hook, which runs before the recompute) stay as they are, and the recompute calls the block's
own forward directly, so those hooks do not fire twice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from llama3hp.model.llama import Transformer


def _checkpointed(block_forward, *args):
    if not torch.is_grad_enabled():  # inference, evaluation: nothing to save, nothing to recompute
        return block_forward(*args)
    return torch.utils.checkpoint.checkpoint(
        block_forward, *args, use_reentrant=False, preserve_rng_state=False
    )


def is_checkpointed(block: nn.Module) -> bool:
    return "forward" in vars(block)


def apply_ac(models: Transformer | Sequence[Transformer], every: int | None) -> int:
    """Full activation checkpointing of the transformer blocks whose layer id is a multiple of
    `every` (None: none; blocks checkpointed before are restored), in `models` (a Transformer, or a
    pipeline rank's chunks). By layer id, so every pipeline split of a model checkpoints the same
    blocks. Returns how many blocks are checkpointed."""
    if every is not None and every < 1:
        raise ValueError(f"activation checkpointing interval must be >= 1, got {every}")
    n = 0
    for model in [models] if isinstance(models, Transformer) else models:
        for block in model.blocks():
            vars(block).pop("forward", None)  # back to the class's forward
            if every is not None and block.layer_id % every == 0:
                block.forward = functools.partial(_checkpointed, block.forward)  # type: ignore[method-assign]
                n += 1
    return n
