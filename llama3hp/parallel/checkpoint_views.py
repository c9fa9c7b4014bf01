"""Global per-parameter views of a ParallelModel's shards, so DCP checkpoints reshard across layouts.

A checkpoint stores every parameter and AdamW moment under its model name with its GLOBAL shape,
exactly as one process stores it (`model.<fqn>`, `optim.state.<fqn>.{exp_avg,exp_avg_sq,step}`).
On a mesh a rank holds, per ZeRO bucket, a flat fp32 range of the TP-local parameters packed in
the bucket; that range is cut into row-contiguous rectangular blocks of each parameter
(a partial first row, whole rows, a partial last row), each placed at its global offset (TP shards
offset along the dim in `ParallelModel.tp_dims`). The blocks become the local shards of a ShardedTensor, whose chunks DCP
writes as they are and, on load, intersects with whatever chunks a checkpoint holds: any layout
(or one process) reads any other.

Save: each rank writes only its unique range (its DP x CP slice of every bucket; TP-replicated
buckets from TP rank 0 only), so no element is written twice. Load: ZeRO-0 replicas and the model
weights read the whole bucket (stage 0) or the rank's slice (stages 1-3, followed by the usual
all-gather of `after_optimizer_step`). Every view aliases the live buffer: DCP reads in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed._shard.sharding_spec import ShardingSpec

if TYPE_CHECKING:
    from llama3hp.parallel.parallelize import ParallelModel
    from llama3hp.parallel.zero import _Bucket

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def row_blocks(shape: tuple[int, ...], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Rectangular (offsets, sizes) blocks that cover flat elements [start, end) of a row-major tensor
    of `shape` (1-D or 2-D), each contiguous in memory, in flat order."""
    if end <= start:
        return []
    if len(shape) == 1:
        return [((start,), (end - start,))]
    if len(shape) != 2:
        raise ValueError(f"checkpoint sharding handles 1-D and 2-D parameters, got shape {tuple(shape)}")
    C = shape[1]
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    r, c = divmod(start, C)
    if c:  # a partial first row
        stop = min(end, (r + 1) * C)
        out.append(((r, c), (1, stop - start)))
        start, r = stop, r + 1
    whole = (end - start) // C
    if whole:
        out.append(((r, 0), (whole, C)))
        start, r = start + whole * C, r + whole
    if end > start:  # a partial last row
        out.append(((r, 0), (1, end - start)))
    return out


@dataclass
class _Entry:
    fqn: str
    offset: int  # where the parameter starts in its bucket's flat buffer
    shape: tuple[int, ...]  # TP-local shape
    global_shape: tuple[int, ...]
    tp_offset: tuple[int, ...]  # global offset of the TP-local tensor


def _entries(pm: ParallelModel) -> list[tuple[_Bucket, list[_Entry]]]:
    """(bucket, its parameters as entries) for every bucket of the rank."""
    names = {id(p): n for n, p in pm.named_parameters().items()}
    tp_size, tp_rank = pm.tp.size, pm.tp.rank
    out = []
    for b in pm.dp.buckets:
        entries: list[_Entry] = []
        off = 0
        for p in b.params:
            shape = tuple(p.shape)
            gshape, toff = list(shape), [0] * len(shape)
            d = pm.tp_dims.get(names[id(p)])
            if d is not None and tp_size > 1:
                gshape[d] *= tp_size
                toff[d] = tp_rank * shape[d]
            entries.append(_Entry(names[id(p)], off, shape, tuple(gshape), tuple(toff)))
            off += p.numel()
        out.append((b, entries))
    return out


def global_shapes(pm: ParallelModel) -> dict[str, tuple[int, ...]]:
    """{fqn: global shape} of the parameters this rank holds."""
    return {e.fqn: e.global_shape for _, entries in _entries(pm) for e in entries}


class _LocalBlocksSpec(ShardingSpec):
    """Metadata naming this rank's blocks only (see `block_tensor`)."""

    def __init__(self, metadata: ShardedTensorMetadata):
        self.metadata = metadata

    def build_metadata(self, tensor_sizes, tensor_properties) -> ShardedTensorMetadata:
        return self.metadata

    def shard(self, tensor, src_rank=0, process_group=None):
        raise TypeError("checkpoint views are read and written by DCP only; they cannot scatter a tensor")


def block_tensor(
    size: tuple[int, ...], blocks: list[tuple[tuple[int, ...], torch.Tensor]], group: dist.ProcessGroup | None
) -> ShardedTensor:
    """A ShardedTensor of global `size` whose local shards are `blocks` (global offsets, views).

    Built without ShardedTensor's cross-rank checks: they demand metadata of every rank's shards
    covering the tensor without overlap (an all-gather per tensor, and ZeRO-0 replicas overlap by
    design), while DCP reads only the local shards and the global size and plans the rest itself.
    """
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    shards = [
        Shard(t, ShardMetadata(list(off), list(t.shape), f"rank:{rank}/{t.device}")) for off, t in blocks
    ]
    t0 = blocks[0][1]
    props = TensorProperties(dtype=t0.dtype, layout=torch.strided, requires_grad=False)
    md = ShardedTensorMetadata([s.metadata for s in shards], torch.Size(size), props)
    st = ShardedTensor.__new__(
        ShardedTensor,
        _LocalBlocksSpec(md),
        *size,
        dtype=t0.dtype,
        layout=torch.strided,
        pin_memory=False,
        requires_grad=False,
    )
    st._local_shards = shards
    st._prepare_init(process_group=group, init_rrefs=False)
    st._post_init()
    return st


class _Collector:
    """Gathers the blocks of each key (a tuple of names) into ShardedTensors."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.blocks: dict[tuple[str, ...], list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        self.shapes: dict[tuple[str, ...], tuple[int, ...]] = {}

    def add(self, key: tuple[str, ...], e: _Entry, flat: torch.Tensor, base: int, lo: int, hi: int) -> None:
        """Blocks of entry e within bucket range [lo, hi) of `flat` (whose element 0 is bucket index base)."""
        a, z = max(lo, e.offset), min(hi, e.offset + _numel(e.shape))
        for offs, sizes in row_blocks(e.shape, a - e.offset, z - e.offset):
            first = e.offset + _flat_index(offs, e.shape) - base
            view = flat[first : first + _numel(sizes)].view(sizes)
            goffs = tuple(o + t for o, t in zip(offs, e.tp_offset))
            self.blocks.setdefault(key, []).append((goffs, view))
        self.shapes[key] = e.global_shape

    def build(self) -> dict[tuple[str, ...], ShardedTensor]:
        return {k: block_tensor(self.shapes[k], b, self.group) for k, b in self.blocks.items()}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _flat_index(offs, shape) -> int:
    return offs[0] if len(shape) == 1 else offs[0] * shape[1] + offs[1]


def init_adam_state(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (step 0, zero moments) for every shard that has none yet, as AdamW
    would on its first step, so a checkpoint has tensors to load into."""
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for b in pm.dp.buckets:
        st = optimizer.state[b.shard]
        if not st:
            step_dev = b.shard.device if fused else torch.device("cpu")
            st["step"] = torch.zeros((), dtype=torch.float32, device=step_dev)
            for k in ADAM_MOMENTS:
                st[k] = torch.zeros_like(b.shard, memory_format=torch.preserve_format)


def sharded_state_dict(
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer | None,
    group: dist.ProcessGroup | None,
    *,
    for_save: bool,
) -> dict:
    """{"model": {fqn: ShardedTensor}, "optim": {"state": {fqn: {exp_avg, exp_avg_sq, step}}}} whose
    local shards alias this rank's buffers (see the module docstring for which ranges)."""
    dp = pm.dp
    model, optim = _Collector(group), _Collector(group)
    steps: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        init_adam_state(pm, optimizer)
    for b, entries in _entries(pm):
        numel = sum(_numel(e.shape) for e in entries)
        lo, hi = b.slice.start, min(b.slice.stop, numel)
        if for_save and b.tp_replicated and pm.mesh.tp_rank != 0:
            lo = hi = 0  # the TP ranks hold identical copies: TP rank 0 writes them
        if dp.stage == 0:  # replicas: save one slice each, load the whole bucket
            src, base = b.flat_param, 0
            if not for_save:
                lo, hi = 0, numel
        else:
            src, base = b.shard.detach(), b.slice.start
        st = optimizer.state[b.shard] if optimizer is not None else None
        for e in entries:
            model.add((e.fqn,), e, src, base, lo, hi)
            if st is not None:
                for k in ADAM_MOMENTS:
                    optim.add((e.fqn, k), e, st[k], base, lo, hi)
                steps[e.fqn] = st["step"]
    out: dict = {"model": {k[0]: v for k, v in model.build().items()}}
    if optimizer is not None:
        state: dict[str, dict] = {fqn: {"step": s} for fqn, s in steps.items()}
        for (fqn, k), v in optim.build().items():
            state[fqn][k] = v
        out["optim"] = {"state": state}
    return out


def finish_load(pm: ParallelModel, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """After DCP filled the views: one step count per shard, then the weights all-gathered into the
    model (stages 1-3; stage 0 read whole buckets)."""
    if optimizer is not None:
        for b, entries in _entries(pm):
            step = state["optim"]["state"][entries[0].fqn]["step"]
            optimizer.state[b.shard]["step"].copy_(step)
    # Stages 1-2 gather every bucket; stage 3 the always-whole ones (blocks gather on use).
    pm.after_optimizer_step()
