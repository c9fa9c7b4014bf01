"""apply_fp8: converts a model's chosen nn.Linear modules to FP8 from outside the model.

Like torchao's convert_to_float8_training, the model code stays plain PyTorch: this walks the
module tree, picks linears by FQN, and swaps each for an Fp8Linear (native recipes, sharing the
same Parameters) or a Transformer Engine Linear (TE recipes; see te.py). Apply it after building
(meta device is fine) and before tensor parallelism, compile and data-parallel sharding.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from llama3hp.fp8.config import Fp8Config, tp_split
from llama3hp.fp8.linear import Fp8Linear

_BLOCK_RE = re.compile(r"^layers\.(\d+)\.")


def _block_range(model: nn.Module) -> tuple[int, int] | None:
    args = getattr(model, "args", None)
    if args is not None and hasattr(args, "n_layers"):
        return 0, args.n_layers - 1
    ids = [int(m.group(1)) for name, _ in model.named_modules() if (m := _BLOCK_RE.match(name + "."))]
    return (min(ids), max(ids)) if ids else None


def select_fp8_linears(model: nn.Module, config: Fp8Config) -> list[str]:
    """FQNs of the nn.Linear modules `config` puts in FP8, in module order."""
    config.validate()
    if not config.enabled:
        return []
    blocks = _block_range(model) if config.skip_first_last_blocks else None
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        if blocks is not None and (m := _BLOCK_RE.match(name)) and int(m.group(1)) in blocks:
            continue
        chosen.append(name)
    return chosen


def fp8_linear_names(model: nn.Module) -> list[str]:
    """FQNs of the modules of `model` that run in FP8 (Fp8Linear, or te.pytorch.Linear), in module order."""
    te_linear = None
    if any(type(m).__module__.startswith("transformer_engine") for m in model.modules()):
        import transformer_engine.pytorch as te

        te_linear = te.Linear
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, Fp8Linear) or (te_linear is not None and isinstance(mod, te_linear))
    ]


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def local_features(fqn: str, linear: nn.Linear, tp_size: int) -> tuple[int, int]:
    """(in, out) features of this rank's shard of `linear` once tensor parallelism (`TP_SPLIT`) cuts it."""
    split = tp_split(fqn)
    fin, fout = linear.in_features, linear.out_features
    if tp_size > 1 and split == "column":
        fout //= tp_size
    elif tp_size > 1 and split == "row":
        fin //= tp_size
    return fin, fout


def apply_fp8(
    model: nn.Module, config: Fp8Config | None = None, *, tp_size: int = 1, **te_kwargs
) -> list[str]:
    """Swaps the linears chosen by `config` (default Fp8Config()) in place; returns their FQNs.

    Native recipes ("rowwise", "emulated") keep the Parameters (state dict and optimizer unchanged),
    so the model can then be tensor-parallelised: the parallel blocks call the Fp8Linear modules (or
    their `Fp8Gemms` on the overlapped paths). Under "rowwise" a linear whose shard (`tp_size`, split
    by `TP_SPLIT`) has in/out features that are not multiples of 16 stays in high precision
    (torch._scaled_mm needs 16-aligned dims). TE recipes forward `te_kwargs` (tp_group, tp_size,
    sequence_parallel, parallel_modes) to te.apply_te.
    """
    config = (config or Fp8Config()).validate()
    fqns = select_fp8_linears(model, config)
    if config.uses_te:
        from llama3hp.fp8.te import apply_te

        if tp_size > 1:
            te_kwargs["tp_size"] = tp_size
        return apply_te(model, fqns, config, **te_kwargs)
    if te_kwargs:
        raise ValueError(f"arguments {sorted(te_kwargs)} apply only to Transformer Engine recipes (te_*)")
    converted = []
    for fqn in fqns:
        mod = model.get_submodule(fqn)
        if isinstance(mod, Fp8Linear):
            continue
        assert isinstance(mod, nn.Linear), fqn  # select_fp8_linears picks nn.Linear modules
        if config.recipe == "rowwise" and any(n % 16 for n in local_features(fqn, mod, tp_size)):
            continue
        _set_submodule(model, fqn, Fp8Linear.from_linear(mod, config))
        converted.append(fqn)
    return converted
