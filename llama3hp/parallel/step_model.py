"""The step interface: what the trainer calls, the same on one process and on any mesh.

`llama3hp.parallel.parallelize(model, mesh, cfg)` returns a `StepModel`: a `LocalModel` on one
process (mesh None), a `ParallelModel` on a mesh. The trainer holds one and never asks which:

    step = model.forward_backward(batches, objective)   # all micro-batches of one optimizer step
    norm = model.clip_grad_norm_(max_norm)
    optimizer.step(); model.after_optimizer_step(); model.zero_grad()
    # optimizer = AdamW(model.param_groups(weight_decay), ...); checkpoints through
    # model.checkpoint_state(optimizer, for_save) and model.finish_load(optimizer, state)

Mixed precision: with `amp_dtype` the forward of every micro-batch runs under autocast and its
backward outside it, as on CUDA, where autograd's backward thread never sees autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn

from llama3hp.data.batch import Batch
from llama3hp.train.objectives import NextTokenLoss, Objective, ObjectiveOutput


@dataclass
class StepStats:
    """What one optimizer step's forward and backward computed (the same on every rank)."""

    loss: torch.Tensor  # fp32 scalar: the objective's loss sum over the step / count
    count: torch.Tensor  # fp32 scalar: the step's count (target tokens, pairs, ...) over every rank
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # each stat's sum / count


class StepTotals:
    """Sums of the objective's outputs over a step's micro-batches (and, reduced, over ranks)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.stats: dict[str, torch.Tensor] = {}

    def add(self, out: ObjectiveOutput) -> None:
        self.loss = self.loss + out.loss_sum.detach()
        for k, v in out.stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v.detach().float()

    def result(self, count: torch.Tensor) -> StepStats:
        return StepStats(self.loss / count, count, {k: v / count for k, v in sorted(self.stats.items())})


def autocast_context(amp_dtype: torch.dtype | None, device: torch.device):
    """Autocast to amp_dtype on `device` (nothing for None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def weight_decay_groups(named: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices, none for norms and biases (1-D parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named.items():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(("norm.weight", ".bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class StepModel(Protocol):
    """One rank's share of the model and the step functions (see the module docstring)."""

    @property
    def chunks(self) -> Sequence[nn.Module]:
        """The model modules this rank runs: one Transformer, or its pipeline chunks."""
        ...

    @property
    def tp_dims(self) -> dict[str, int]:
        """{parameter name: the dim split over tensor parallelism} (empty on one process)."""
        ...

    def forward_backward(self, batches: list[Batch], objective: Objective | None = None) -> StepStats:
        """Forward and backward of every micro-batch of one optimizer step (objective default:
        NextTokenLoss()); gradients end reduced (and sharded) for the optimizer."""
        ...

    def evaluate(self, batches: list[Batch], objective: Objective) -> StepStats:
        """The same micro-batches through the forward only, without gradients (held-out metrics, a
        frozen reference model's pass); the same StepStats on every rank."""
        ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradient; gradients scaled down to max_norm when above (0: no clipping)."""
        ...

    def param_groups(self, weight_decay: float) -> list[dict]: ...

    def after_optimizer_step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def named_parameters(self) -> dict[str, nn.Parameter]: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank, CPU tensors under their names."""
        ...

    def global_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None, *, for_save: bool) -> dict[str, Any]:
        """{"model": {name: tensor}, "optim": {"state": {name: {step, exp_avg, exp_avg_sq}}}} under
        global names and shapes for DCP, aliasing this rank's buffers."""
        ...

    def finish_load(self, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        """After DCP filled `checkpoint_state(..., for_save=False)`: make the model use it."""
        ...

    def fp8_linear_names(self) -> list[str]:
        """FQNs of the whole model's FP8 linears (every pipeline stage's, the same on every rank)."""
        ...


class LocalModel:
    """The StepModel of one process: the plain model, its parameters and AdamW as they are."""

    def __init__(self, model: nn.Module, *, amp_dtype: torch.dtype | None = None):
        self.model = model
        self.chunks = [model]
        self.tp_dims: dict[str, int] = {}
        self.amp_dtype = amp_dtype
        # AdamW's param_groups in DCP's name-keyed form, from the checkpoint_state that a load fills
        # (finish_load hands them back with the loaded state; hyper-parameters stay the config's).
        self._param_groups: list[dict[str, Any]] | None = None

    def forward_backward(self, batches: list[Batch], objective: Objective | None = None) -> StepStats:
        return self._run(batches, objective or NextTokenLoss(), train=True)

    def evaluate(self, batches: list[Batch], objective: Objective) -> StepStats:
        with torch.no_grad():
            return self._run(batches, objective, train=False)

    def _run(self, batches: list[Batch], objective: Objective, train: bool) -> StepStats:
        device = batches[0].inputs.device
        count = torch.stack([objective.count(b) for b in batches]).sum().clamp(min=1.0)
        totals = StepTotals(device)
        for b in batches:
            with autocast_context(self.amp_dtype, device):
                out = self.model(
                    b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, positions=b.positions,
                    doc_prefix=b.doc_prefix,
                )  # fmt: skip
                result = objective(out, b)
            if train:
                (result.loss_sum / count).backward()
            totals.add(result)
        return totals.result(count)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm > 0 else float("inf"), foreach=True
        )

    def param_groups(self, weight_decay: float) -> list[dict]:
        return weight_decay_groups(self.named_parameters(), weight_decay)

    def after_optimizer_step(self) -> None:
        pass  # the optimizer updated the model's own parameters

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model.state_dict().items()}

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None, *, for_save: bool) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, optimizer if optimizer is not None else [])
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            # Only the per-parameter state: hyper-parameters come from the config (a mesh stores no
            # param_groups either, so any layout reads any checkpoint).
            state["optim"] = {"state": optim_sd["state"]}
            self._param_groups = cast(list[dict[str, Any]], optim_sd["param_groups"])
        return state

    def finish_load(self, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        optim_sd = {}
        if optimizer is not None:
            assert self._param_groups is not None, "finish_load follows checkpoint_state(optimizer, ...)"
            optim_sd = {"state": state["optim"]["state"], "param_groups": self._param_groups}
        set_state_dict(
            self.model, optimizer if optimizer is not None else [],
            model_state_dict=state["model"], optim_state_dict=optim_sd,
        )  # fmt: skip

    def fp8_linear_names(self) -> list[str]:
        from llama3hp.fp8 import fp8_linear_names

        return fp8_linear_names(self.model)
