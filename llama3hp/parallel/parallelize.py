"""Apply 4D parallelism to a plain Transformer: `parallelize(model, mesh, cfg)` -> a `StepModel`.

On one process (mesh None) the model stays as it is, with activation checkpointing, behind the
`LocalModel` step interface. On a mesh the order is (the plain model is either built and
initialised whole first, or left on the meta device and only this rank's shards materialised after
step 2 with the same values: every layout starts from the same weights):
1. TP/SP and CP (`apply_tp`: swaps attention, FFN, embedding and head, shards weights: must precede
   any flattening);
2. the pipeline split into this rank's model chunks (the same Transformer with the parts a stage
   does not own removed; parameter names kept);
3. activation checkpointing of the chosen blocks (`apply_ac`);
4. ZeRO data parallelism over DP x CP (flattens what the rank finally holds into buckets).

    model = parallelize(meta_model, mesh, cfg, init_seed=seed)   # this rank's ParallelModel
    opt = torch.optim.AdamW(model.param_groups(weight_decay), lr=..., betas=..., eps=...)
    stats = model.forward_backward(micro_batches, objective)    # all micro-batches of one step
    norm = model.clip_grad_norm_(max_norm); opt.step(); model.after_optimizer_step(); model.zero_grad()

Every stage runs the model's own forward (`Transformer.forward`); the last one hands the
`HeadOutput` to the objective. Shape legend: B rows, T tokens per row, D model dim.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llama3hp.data.batch import Batch
from llama3hp.model.llama import Transformer, init_parameter
from llama3hp.model.rope import rope_inv_freq
from llama3hp.parallel.ac import apply_ac
from llama3hp.parallel.comm import all_gather_dim, all_reduce
from llama3hp.parallel.context import CPComm, shard_batch
from llama3hp.parallel.mesh import DeviceMesh4D, ParallelConfig, validate_layout
from llama3hp.parallel.pipeline import (
    PipelineExecutor,
    build_schedule,
    forward_schedule,
    partition_layers,
    simulate,
)
from llama3hp.parallel.step_model import (
    LocalModel,
    StepModel,
    StepStats,
    StepTotals,
    autocast_context,
)
from llama3hp.parallel.tensor import apply_tp
from llama3hp.parallel.tp_comm import TPComm
from llama3hp.parallel.zero import ZeroDataParallel
from llama3hp.train.objectives import NextTokenLoss, Objective


def build_stage_module(model: Transformer, start: int, end: int, first: bool, last: bool) -> Transformer:
    """A shallow copy of `model` holding layers [start, end) (same parameter objects and names), the
    embedding only when `first`, the final norm and head only when `last`."""
    stage = copy.copy(model)
    stage._modules = dict(model._modules)
    stage._parameters, stage._buffers = dict(model._parameters), dict(model._buffers)
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(start, end)})
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm, stage.output = None, None
    return stage


@functools.cache
def check_schedule(kind: str, pp: int, virtual: int, m: int) -> None:
    """Raise a one-line error if the schedule cannot run (simulated once per shape)."""
    try:
        simulate(kind, pp, virtual, m)
    except RuntimeError:
        raise ValueError(
            f"the {kind} schedule with pp={pp}, virtual stages={virtual} cannot run {m} micro-batches: "
            f"use a multiple of pp ({pp}) or pp_schedule='1f1b'"
        ) from None


class ParallelModel:
    """This rank's share of the model on a mesh (its pipeline chunks, TP/CP-sharded, ZeRO-wrapped):
    the StepModel of `llama3hp.parallel.step_model` over the mesh's process groups."""

    def __init__(
        self,
        model: Transformer,
        mesh: DeviceMesh4D,
        cfg: ParallelConfig,
        init_seed: int | None = None,
        *,
        ac_every: int | None = None,
        amp_dtype: torch.dtype | None = None,
    ):
        self.mesh, self.cfg, self.args, self.amp_dtype = mesh, cfg, model.args, amp_dtype
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and init_seed is None:
            raise ValueError(
                "the model is on the meta device: pass init_seed to parallelize to materialise this rank's shards"
            )
        if init_seed is not None and not on_meta:
            raise ValueError(
                "init_seed materialises a meta-device model: build the model under torch.device('meta') "
                "or drop init_seed for an initialised one"
            )
        validate_layout(cfg, mesh.dims, model.args)
        pp = mesh.dims.pp
        if pp > 1 and model.args.tie_embeddings:
            raise ValueError(
                "pipeline parallelism with tied embeddings is not supported: use an untied preset"
            )
        self.tp = TPComm(
            mesh.tp_group, cfg.sequence_parallel, cfg.tp_overlap, cfg.tp_overlap_chunks, cfg.tp_chunked_loss
        )
        self.cp = CPComm(mesh.cp_group, cfg.cp_overlap)
        # {name: dim split over TP} of the sharded parameters: owned here, read by materialisation,
        # ZeRO's bucketing, full state dicts and the checkpoint views.
        self.tp_dims = apply_tp(model, self.tp, self.cp if self.cp.size > 1 else None)
        self.virtual = cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved" else 1
        ranges = partition_layers(
            model.args.n_layers, pp, self.virtual, cfg.pp_edge_cost, cfg.pp_stage_layers
        )
        self.n_vs = pp * self.virtual
        self.chunks: list[Transformer] = []
        for c in range(self.virtual):
            vs = c * pp + mesh.pp_rank
            self.chunks.append(
                build_stage_module(model, *ranges[vs], first=vs == 0, last=vs == self.n_vs - 1)
            )
        if init_seed is not None:  # after TP and the pipeline split: only what this rank keeps
            materialize_local(self.chunks, self.tp, self.tp_dims, mesh.device, init_seed)
        apply_ac(self.chunks, ac_every)
        named = self.named_parameters()
        self.dp = ZeroDataParallel(
            self.chunks, mesh.dp_cp_group, stage=cfg.zero_stage, bucket_mb=cfg.dp_bucket_mb,
            overlap=cfg.dp_overlap, tp_sharded=[named[n] for n in self.tp_dims if n in named],
            tp_group=mesh.tp_group, sequence_parallel=self.tp.size > 1 and cfg.sequence_parallel,
            backward_prefetch=cfg.zero3_backward_prefetch, gather_dtype=getattr(torch, cfg.zero3_gather_dtype),
        )  # fmt: skip
        self.executor = PipelineExecutor(mesh.pp_group, mesh.pp_ranks, mesh.pp_rank, self.virtual)
        self._stat_names: dict[type, list[str]] = {}  # per objective type, told by the last stage

    # ------------------------------------------------------------------ the step
    def forward_backward(self, batches: list[Batch], objective: Objective | None = None) -> StepStats:
        """Forward and backward of every micro-batch of one optimizer step through the pipeline
        schedule; gradients end reduced (and sharded) for the optimizer. Each micro-batch's loss sum
        is divided by the step's global count (over the DP ranks), so the gradient is that of the
        global mean. Returns the same StepStats on every rank."""
        return self._run(batches, objective or NextTokenLoss(), train=True)

    def evaluate(self, batches: list[Batch], objective: Objective) -> StepStats:
        """Forward only, without gradients: every micro-batch through the stages in order (each stage
        forwards micro-batch i once its input arrived; no backward, so no bubble to hide)."""
        with torch.no_grad():
            return self._run(batches, objective, train=False)

    def _run(self, batches: list[Batch], objective: Objective, train: bool) -> StepStats:
        m = len(batches)
        if train and (self.cfg.pp_schedule == "interleaved" or self.mesh.dims.pp > 1):
            check_schedule(self.cfg.pp_schedule, self.mesh.dims.pp, self.virtual, m)
        dev = batches[0].inputs.device
        count = torch.stack([objective.count(b) for b in batches]).sum()
        all_reduce(count, self.mesh.dp_group)
        count = count.clamp(min=1.0)
        local = [
            shard_batch(b, self.cp.size, self.cp.rank, doc_positions=self.args.doc_positions) for b in batches
        ]
        totals = StepTotals(dev)
        if train:
            self.dp.begin_step(m)

        def forward(mb: int, c: int, x: torch.Tensor | None) -> torch.Tensor:
            b = local[mb]
            with autocast_context(self.amp_dtype, dev):
                out = self.chunks[c](
                    b.inputs if x is None else x, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                    positions=b.positions, doc_prefix=b.doc_prefix,
                )  # fmt: skip
                if self.chunks[c].output is None:  # not the last virtual stage: hidden states on
                    return out
                result = objective(out, b)
            totals.add(result)
            return result.loss_sum / count

        B, Tl = local[0].inputs.shape
        sp = self.tp.size > 1 and self.cfg.sequence_parallel
        act_shape = (B, Tl // self.tp.size if sp else Tl, self.args.dim)
        act_dtype = next(iter(self.chunks[0].parameters())).dtype
        if train:
            actions = build_schedule(
                self.cfg.pp_schedule, self.mesh.dims.pp, self.virtual, m, self.mesh.pp_rank
            )
        else:
            actions = forward_schedule(self.virtual, m)
        self.executor.run(actions, forward, act_shape, act_dtype, dev)
        if train:
            self.dp.finish_grad_sync()
        # The sums live on the last stage, over this rank's CP tokens and DP rows. Only the last stage
        # ran the objective, so it tells the others which stats to reduce (an objective's stats, DPO's
        # rewards and accuracy, are its own; pre-training's has none and skips this).
        names = sorted(totals.stats)
        if self.mesh.dims.pp > 1:  # once per objective type: its stats' names do not change
            if type(objective) not in self._stat_names:
                box: list[Any] = [names]
                dist.broadcast_object_list(box, group=self.mesh.pp_group, group_src=self.mesh.dims.pp - 1)
                self._stat_names[type(objective)] = box[0]
            names = self._stat_names[type(objective)]
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        flat = torch.stack([totals.loss, *(totals.stats.get(n, zero) for n in names)])
        all_reduce(flat, self.mesh.dp_cp_group)
        all_reduce(flat, self.mesh.pp_group)
        totals.loss = flat[0]
        totals.stats = dict(zip(names, flat[1:]))
        return totals.result(count)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradient over all ranks; grads scaled down to max_norm when above."""
        sq = self.dp.grad_norm_sq_local(self.mesh.tp_rank)
        all_reduce(sq, self.mesh.tp_group)
        all_reduce(sq, self.mesh.pp_group)
        norm = sq.sqrt()
        if max_norm > 0 and torch.isfinite(norm):
            self.dp.scale_grads(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.dp.param_groups(weight_decay)

    def after_optimizer_step(self) -> None:
        self.dp.after_optimizer_step()

    def zero_grad(self) -> None:
        self.dp.zero_grad()

    # ------------------------------------------------------------------ state
    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters under their full model names (TP shards: see `tp_dims`)."""
        out = {}
        for chunk in self.chunks:
            out.update(dict(chunk.named_parameters()))
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters on every rank (gathered over ZeRO-3, TP and PP): for tests,
        exports and checkpoints across layouts."""
        with self.dp.unsharded():
            mine = {}
            for name, p in self.named_parameters().items():
                t = p.detach()
                if self.tp.size > 1 and name in self.tp_dims:
                    t = all_gather_dim(t.contiguous(), self.tp_dims[name], self.tp.group)
                mine[name] = t.cpu().clone()
        if self.mesh.pp_group is None:
            return mine
        parts: list[dict] = [None] * self.mesh.dims.pp  # type: ignore[list-item]
        dist.all_gather_object(parts, mine, group=self.mesh.pp_group)
        return {k: v for part in parts for k, v in part.items()}

    def shard_metadata(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """{name: (offsets, global shape)} of this rank's TP shard of each parameter (DCP-style)."""
        out = {}
        for name, p in self.named_parameters().items():
            shape = list(p.shape)
            offsets = [0] * p.dim()
            if name in self.tp_dims:
                d = self.tp_dims[name]
                offsets[d] = self.tp.rank * shape[d]
                shape[d] *= self.tp.size
            out[name] = (tuple(offsets), tuple(shape))
        return out

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        from llama3hp.parallel.checkpoint_views import global_shapes

        return global_shapes(self)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None, *, for_save: bool) -> dict[str, Any]:
        from llama3hp.parallel.checkpoint_views import sharded_state_dict

        return sharded_state_dict(self, optimizer, self.mesh.world_group, for_save=for_save)

    def finish_load(self, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        from llama3hp.parallel.checkpoint_views import finish_load

        finish_load(self, optimizer, state)

    def fp8_linear_names(self) -> list[str]:
        from llama3hp.fp8 import fp8_linear_names

        mine = sorted({name for chunk in self.chunks for name in fp8_linear_names(chunk)})
        if self.mesh.pp_group is None:
            return mine
        parts: list[list[str]] = [[] for _ in range(self.mesh.dims.pp)]
        dist.all_gather_object(parts, mine, group=self.mesh.pp_group)
        return sorted({name for part in parts for name in part})


def materialize_local(
    chunks: list[Transformer], tp: TPComm, tp_dims: dict[str, int], device: torch.device, seed: int
) -> None:
    """Give each meta parameter of this rank's chunks its TP shard of the whole model's initial value.

    Per parameter, one at a time: the FULL tensor is drawn on the CPU (`init_parameter`: its
    generator is seeded by name and draws every element, so a slice cannot be drawn alone) and this
    rank's slice along tp_dims[name] is copied to `device`. Peak host memory is the largest
    parameter (the 405B embedding: 128,256 x 16,384 fp32 = 8.4 GB); time is that of drawing every
    parameter this rank holds whole, ~1/pp of the model (405B, PP16: ~25G normal samples per rank,
    minutes on one CPU core), against the whole model (1.6 TB fp32) per rank for whole-then-shard.
    """
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if not p.is_meta:
                continue
            dim = tp_dims.get(name)
            full_shape = list(p.shape)
            if dim is not None:
                full_shape[dim] *= tp.size
            value = init_parameter(chunk.args, name, tuple(full_shape), seed)
            if dim is not None:
                value = value.chunk(tp.size, dim=dim)[tp.rank]
            new = nn.Parameter(value.to(device=device, dtype=p.dtype).contiguous(), p.requires_grad)
            # In place of the meta tensor (set_data refuses a device change): every module and chunk
            # that holds this Parameter object sees the value.
            torch.utils.swap_tensors(p, new)
        chunk.inv_freq = rope_inv_freq(chunk.args, device=device)


def parallelize(
    model: Transformer,
    mesh: DeviceMesh4D | None,
    cfg: ParallelConfig,
    *,
    init_seed: int | None = None,
    ac_every: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> StepModel:
    """This rank's StepModel (see the module docstring): a LocalModel on one process (mesh None, the
    model materialised), a ParallelModel on a mesh.

    On a mesh `model` is either materialised and initialised (whole-then-shard), or on the meta
    device with `init_seed` given: then only this rank's shards are materialised on mesh.device,
    equal to the slices of `model.init_weights(init_seed)` (`materialize_local`). ac_every: checkpoint
    the activations of every ac_every-th block (None: none). amp_dtype: autocast dtype of the forwards.
    """
    if mesh is None:
        apply_ac(model, ac_every)
        return LocalModel(model, amp_dtype=amp_dtype)
    return ParallelModel(model, mesh, cfg, init_seed, ac_every=ac_every, amp_dtype=amp_dtype)
