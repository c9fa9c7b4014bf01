"""Transformer Engine recipes: the block's linears become te.pytorch.Linear modules run under TE's
FP8 autocast, with delayed scaling (amax history, margin, E4M3 forward / E5M2 backward) or
current scaling. Used only when `transformer_engine` imports.

Tensor parallelism goes through TE's own arguments: column-parallel for wq/wk/wv/w1/w3,
row-parallel for wo/w2 (Megatron's split), `tp_group`/`tp_size` and `sequence_parallel`.
A TE Linear built with tp_size > 1 holds this rank's shard, cut here from the full weight.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from llama3hp.fp8.config import TP_SPLIT, Fp8Config, tp_split


@functools.cache
def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that fails to load its CUDA library
        return False
    return True


def _require_te():
    if not te_available():
        raise RuntimeError(
            "Transformer Engine recipes need transformer_engine: pip install 'transformer-engine[pytorch]' "
            "or use recipe='rowwise'"
        )
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    return te, te_recipe


def build_te_recipe(config: Fp8Config):
    """TE recipe object for config.recipe: DelayedScaling or Float8CurrentScaling."""
    _, te_recipe = _require_te()
    fmt = te_recipe.Format.HYBRID if config.te_format == "hybrid" else te_recipe.Format.E4M3
    if config.recipe == "te_delayed":
        return te_recipe.DelayedScaling(
            margin=config.margin,
            fp8_format=fmt,
            amax_history_len=config.amax_history_len,
            amax_compute_algo=config.amax_compute_algo,
        )
    if config.recipe == "te_current":
        if not hasattr(te_recipe, "Float8CurrentScaling"):
            raise RuntimeError("recipe te_current needs Transformer Engine >= 2.2 (Float8CurrentScaling)")
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    raise ValueError(f"recipe {config.recipe!r} is not a Transformer Engine recipe (te_delayed, te_current)")


def te_autocast(config: Fp8Config, amax_group=None):
    """Context manager that runs TE modules in FP8 with config's recipe; amax_group reduces the
    delayed-scaling amaxes across ranks (the TP x DP group that shares weights)."""
    te, _ = _require_te()
    recipe = build_te_recipe(config)
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def _shard(weight: torch.Tensor, mode: str | None, rank: int, size: int) -> torch.Tensor:
    if size == 1 or mode is None:
        return weight
    dim = 0 if mode == "column" else 1
    if weight.shape[dim] % size:
        raise ValueError(f"weight dim {dim} of size {weight.shape[dim]} is not divisible by tp_size {size}")
    return weight.chunk(size, dim=dim)[rank]


def apply_te(
    model: nn.Module,
    fqns: list[str],
    config: Fp8Config,
    *,
    tp_group=None,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    parallel_modes: dict[str, str] | None = None,
    amax_group=None,
) -> list[str]:
    """Replaces the nn.Linear modules at `fqns` by te.pytorch.Linear and wraps model's forward in
    te_autocast (forward pre/post hooks, exited even when forward raises). Returns the FQNs."""
    te, _ = _require_te()
    modes = TP_SPLIT if parallel_modes is None else parallel_modes
    rank = tp_group.rank() if tp_group is not None else 0
    for fqn in fqns:
        lin = model.get_submodule(fqn)
        assert isinstance(lin, nn.Linear), fqn
        mode = tp_split(fqn, modes) if tp_size > 1 else None
        new = te.Linear(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            params_dtype=lin.weight.dtype,
            device=lin.weight.device,
            tp_group=tp_group,
            tp_size=tp_size,
            parallel_mode=mode,
            sequence_parallel=sequence_parallel,
        )
        if lin.weight.device.type != "meta":
            with torch.no_grad():
                new.weight.copy_(_shard(lin.weight, mode, rank, tp_size))
                if lin.bias is not None:
                    new.bias.copy_(
                        lin.bias if mode != "column" else _shard(lin.bias, "column", rank, tp_size)
                    )
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    stack: list[contextlib.AbstractContextManager] = []

    def enter(_mod, _args):
        ctx = te_autocast(config, amax_group)
        ctx.__enter__()
        stack.append(ctx)

    def leave(_mod, _args, _out):
        stack.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return list(fqns)
