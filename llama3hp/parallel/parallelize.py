"""Apply 4D parallelism to a plain Transformer and run training steps on it.

Order (the plain model is either built and initialised whole first, or left on the meta device and
only this rank's shards materialised after step 2 with the same values: every layout starts from the
same weights): 1. TP/SP and CP (rewrites attention and FFN, shards weights: must precede any flattening);
2. pipeline split into this rank's model chunks (keeps parameter names); 3. ZeRO data parallelism
over DP x CP (flattens what the rank finally holds into buckets). What the trainer calls:

    mesh = build_mesh(cfg)                                   # collective, every rank
    pm = parallelize(model, mesh, cfg)                       # this rank's ParallelModel
    pm = parallelize(meta_model, mesh, cfg, init_seed=seed)  # ... materialising only its shards
    opt = torch.optim.AdamW(pm.param_groups(weight_decay), lr=..., betas=..., eps=...)
    loss = pm.forward_backward(micro_batches)                # all micro-batches of one step
    norm = pm.clip_grad_norm_(max_norm); opt.step(); pm.after_optimizer_step(); pm.zero_grad()

Shape legend: B rows, T tokens per row, D model dim.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from llama3hp.model.llama import document_positions
from llama3hp.parallel.comm import all_gather_dim, all_reduce
from llama3hp.parallel.context import CPComm, shard_for_cp
from llama3hp.parallel.data import ZeroDataParallel
from llama3hp.parallel.mesh import DeviceMesh4D, ParallelConfig, validate_layout
from llama3hp.parallel.pipeline import PipelineExecutor, build_schedule, partition_layers, simulate
from llama3hp.parallel.tensor import TPComm, apply_tp, compute_loss


@dataclass
class MicroBatch:
    """One micro-batch of full rows as the loader gives it to every rank of a DP replica."""

    inputs: torch.Tensor  # [B, T] token ids
    targets: torch.Tensor  # [B, T] next tokens, -100 ignored
    cu_seqlens: torch.Tensor | None = None  # int32 [n_docs + 1] over the B*T tokens
    max_seqlen: int | None = None


@dataclass
class _LocalBatch:
    tokens: torch.Tensor  # [B, T/cp]
    targets: torch.Tensor  # [B, T/cp]
    positions: torch.Tensor  # [B, T/cp] global document positions
    cu_seqlens: torch.Tensor | None  # global
    max_seqlen: int | None


def build_stage_module(model: nn.Module, start: int, end: int, first: bool, last: bool) -> nn.Module:
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
    """This rank's share of the model (its pipeline chunks, TP/CP-sharded, ZeRO-wrapped) and the
    step functions the training loop calls."""

    def __init__(
        self, model: nn.Module, mesh: DeviceMesh4D, cfg: ParallelConfig, init_seed: int | None = None
    ):
        self.mesh, self.cfg, self.args = mesh, cfg, model.args
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
        apply_tp(model, self.tp, self.cp if self.cp.size > 1 else None)
        self.virtual = cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved" else 1
        ranges = partition_layers(
            model.args.n_layers, pp, self.virtual, cfg.pp_edge_cost, cfg.pp_stage_layers
        )
        n_vs = pp * self.virtual
        self.chunks = []
        for c in range(self.virtual):
            vs = c * pp + mesh.pp_rank
            self.chunks.append(build_stage_module(model, *ranges[vs], first=vs == 0, last=vs == n_vs - 1))
        self.n_vs = n_vs
        if init_seed is not None:  # after TP and the pipeline split: only what this rank keeps
            materialize_local(self.chunks, self.tp, mesh.device, init_seed)
        self.dp = ZeroDataParallel(
            self.chunks, mesh.dp_cp_group, stage=cfg.zero_stage, bucket_mb=cfg.dp_bucket_mb,
            overlap=cfg.dp_overlap, tp_group=mesh.tp_group, sequence_parallel=self.tp.size > 1 and cfg.sequence_parallel,
            backward_prefetch=cfg.zero3_backward_prefetch,
            gather_dtype=getattr(torch, cfg.zero3_gather_dtype),
        )  # fmt: skip
        self.executor = PipelineExecutor(mesh.pp_group, mesh.pp_ranks, mesh.pp_rank, self.virtual)

    # ------------------------------------------------------------------ the step
    def _localize(self, b: MicroBatch) -> _LocalBatch:
        B, T = b.inputs.shape
        cu = b.cu_seqlens
        pos = document_positions(cu if self.args.doc_positions else None, B, T, b.inputs.device)
        cp, r = self.cp.size, self.cp.rank
        return _LocalBatch(
            shard_for_cp(b.inputs, cp, r),
            shard_for_cp(b.targets, cp, r),
            shard_for_cp(pos, cp, r),
            cu,
            b.max_seqlen,
        )

    def _stage_forward(self, chunk: nn.Module, lb: _LocalBatch, x: torch.Tensor | None, z_loss_scale: float):
        h = chunk.tok_embeddings(lb.tokens) if chunk.tok_embeddings is not None else x
        for layer in chunk.layers.values():
            h = layer(h, lb.positions, chunk.inv_freq, lb.cu_seqlens, lb.max_seqlen)
        if chunk.norm is None:
            return h
        return compute_loss(chunk, chunk.norm(h), lb.targets, self.tp, z_loss_scale=z_loss_scale)

    def forward_backward(
        self, batches: list[MicroBatch], *, n_targets: torch.Tensor | None = None, z_loss_scale: float = 0.0
    ) -> torch.Tensor:
        """Forward and backward of every micro-batch of one optimizer step through the pipeline schedule;
        gradients end reduced (and sharded) for the optimizer. Each micro-batch's loss is its sum over
        target tokens divided by `n_targets`, the step's global count of target tokens (computed over
        the DP ranks when None), so the gradient is that of the global mean loss.
        Returns the global mean loss (fp32 scalar, the same on every rank)."""
        m = len(batches)
        if self.cfg.pp_schedule == "interleaved" or self.mesh.dims.pp > 1:
            check_schedule(self.cfg.pp_schedule, self.mesh.dims.pp, self.virtual, m)
        dev = batches[0].inputs.device
        if n_targets is None:
            n_targets = sum((b.targets != -100).sum() for b in batches).to(torch.float32)
            all_reduce(n_targets, self.mesh.dp_group)
        n_targets = n_targets.clamp(min=1.0)
        local = [self._localize(b) for b in batches]
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        self.dp.begin_step(m)

        def forward(mb: int, c: int, x: torch.Tensor | None) -> torch.Tensor:
            nonlocal loss_sum
            out = self._stage_forward(self.chunks[c], local[mb], x, z_loss_scale)
            if self.chunks[c].norm is not None:  # last virtual stage: the loss
                loss_sum = loss_sum + out.detach()
                return out / n_targets
            return out

        B, Tl = local[0].tokens.shape
        sp = self.tp.size > 1 and self.cfg.sequence_parallel
        act_shape = (B, Tl // self.tp.size if sp else Tl, self.args.dim)
        act_dtype = next(iter(self.chunks[0].parameters())).dtype
        actions = build_schedule(self.cfg.pp_schedule, self.mesh.dims.pp, self.virtual, m, self.mesh.pp_rank)
        self.executor.run(actions, forward, act_shape, act_dtype, dev)
        self.dp.finish_grad_sync()
        # The loss lives on the last stage, summed over this rank's CP tokens and DP rows.
        all_reduce(loss_sum, self.mesh.dp_cp_group)
        all_reduce(loss_sum, self.mesh.pp_group)
        return loss_sum / n_targets

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
        """This rank's parameters under their full model names (TP shards carry `_tp_dim`)."""
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
                if self.tp.size > 1 and p._tp_dim is not None:
                    t = all_gather_dim(t.contiguous(), p._tp_dim, self.tp.group)
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
            if p._tp_dim is not None:
                offsets[p._tp_dim] = self.tp.rank * shape[p._tp_dim]
                shape[p._tp_dim] *= self.tp.size
            out[name] = (tuple(offsets), tuple(shape))
        return out


def init_parameter_full(args, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 CPU value [shape] that `Transformer.init_weights(seed)` gives the parameter `name`.

    It runs init_weights itself on a stand-in holding only this parameter (the method reads
    `args`, `inv_freq` and `named_parameters()`), so the rule has one definition: a parameter's
    value depends on (seed, name) alone.
    """
    from llama3hp.model import Transformer

    value = torch.empty(shape, dtype=torch.float32)
    stand_in = SimpleNamespace(args=args, inv_freq=torch.empty(0), named_parameters=lambda: [(name, value)])
    Transformer.init_weights(stand_in, seed=seed)
    return value


def materialize_local(chunks: list[nn.Module], tp: TPComm, device: torch.device, seed: int) -> None:
    """Give each meta parameter of this rank's chunks its TP shard of the whole model's initial value.

    Per parameter, one at a time: the FULL tensor is drawn on the CPU (its generator is seeded by
    name and draws every element, so a slice cannot be drawn alone) and this rank's slice along
    `_tp_dim` is copied to `device`. Peak host memory is the largest parameter (the 405B embedding:
    128,256 x 16,384 fp32 = 8.4 GB); time is that of drawing every parameter this rank holds whole,
    ~1/pp of the model (405B, PP16: ~25G normal samples per rank, minutes on one CPU core), against
    the whole model (1.6 TB fp32) per rank for whole-then-shard.
    """
    from llama3hp.model.rope import rope_inv_freq

    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if not p.is_meta:
                continue
            dim = getattr(p, "_tp_dim", None)
            full_shape = list(p.shape)
            if dim is not None:
                full_shape[dim] *= tp.size
            value = init_parameter_full(chunk.args, name, tuple(full_shape), seed)
            if dim is not None:
                value = value.chunk(tp.size, dim=dim)[tp.rank]
            new = nn.Parameter(value.to(device=device, dtype=p.dtype).contiguous(), p.requires_grad)
            new._tp_dim = dim
            # In place of the meta tensor (set_data refuses a device change): every module and chunk
            # that holds this Parameter object sees the value.
            torch.utils.swap_tensors(p, new)
        chunk.inv_freq = rope_inv_freq(chunk.args, device=device)


def parallelize(
    model: nn.Module, mesh: DeviceMesh4D, cfg: ParallelConfig, *, init_seed: int | None = None
) -> ParallelModel:
    """This rank's ParallelModel (see the module docstring).

    `model` is either materialised and initialised (whole-then-shard), or on the meta device with
    `init_seed` given: then only this rank's shards are materialised on mesh.device, equal to the
    slices of `model.init_weights(init_seed)` (`materialize_local`).
    """
    return ParallelModel(model, mesh, cfg, init_seed)
