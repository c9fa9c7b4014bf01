"""Data parallelism with ZeRO sharding over the group of ranks that hold the same parameters
(DP x CP: context-parallel ranks see different tokens of the same rows).

Parameters are packed, per unit (each transformer block, and the rest of a model chunk), into flat
fp32 buckets of at most `bucket_mb` that never mix weight-decay classes or TP-replicated with
TP-sharded parameters. Model parameters become views of the bucket's flat parameter and their
`.grad` views of its flat fp32 gradient, so backward accumulates into the buckets in fp32 in place;
a post-accumulate-grad hook counts the gradients and launches each bucket's reduction
asynchronously while backward goes on (overlap), after the LAST micro-batch (stages 0-1) or after
every micro-batch (stages 2-3).

zero_stage 0: all-reduce, optimizer on full replicas.  1: all-reduce once per step, optimizer
states on a 1/N shard (Megatron's distributed optimizer: full fp32 gradient buckets).
2: gradients sharded too: with overlap on, each bucket is reduce-scattered after EVERY
micro-batch's backward into its fp32 gradient shard and its full-size buffer is freed once the
reduction lands, so only the buckets of the blocks in backward (and at most `MAX_INFLIGHT`
reductions) hold full gradients; without overlap the buffers stay and are reduce-scattered once at
the end.  3: also parameters sharded: a block's bucket is
all-gathered before its forward (the next block's gather launched as the block starts, so it runs
during the block's forward) and before its backward, and freed after each. With `backward_prefetch`
(ParallelConfig.zero3_backward_prefetch, default on) the backward pre-hook of block i also launches
the gather of block i-1, which then runs during block i's backward instead of stalling block i-1's
(FSDP's BACKWARD_PRE); the cost is one more block's parameters held during a backward.
With `gather_dtype` bf16 (ParallelConfig.zero3_gather_dtype) the blocks' matrices travel in bf16
(FSDP's param_dtype) and land in the fp32 parameters as bf16-rounded values: what the GEMMs under
bf16 autocast use anyway (FP8 linears quantize the rounded values, E4M3 being far coarser); the
shards, the optimizer and the norm weights stay fp32.
The optimizer sees one fp32 shard Parameter per bucket (`param_groups`); `after_optimizer_step`
all-gathers the updated shards into the model (stages 1-2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
from torch import nn

from llama3hp.parallel.comm import (
    all_gather_single,
    all_reduce,
    group_rank,
    group_size,
    reduce_scatter_single,
)

# Sharded gradients: per-micro-batch reductions in flight before the oldest is waited for and its
# full-size buffer freed (a few buckets: the communication of one overlaps the next's backward).
MAX_INFLIGHT = 2


class _Bucket:
    def __init__(
        self, params: list[nn.Parameter], decay: bool, tp_replicated: bool, world: int, rank: int, stage: int
    ):
        self.params, self.decay, self.tp_replicated, self.stage = params, decay, tp_replicated, stage
        numel = sum(p.numel() for p in params)
        self.shard_size = math.ceil(numel / world)
        padded = self.shard_size * world
        dev = params[0].device
        self.flat_param = torch.zeros(padded, dtype=torch.float32, device=dev)
        self.flat_grad = torch.zeros(padded, dtype=torch.float32, device=dev)
        off = 0
        for p in params:
            n = p.numel()
            self.flat_param[off : off + n].copy_(p.detach().reshape(-1))
            p.data = self.flat_param[off : off + n].view_as(p)
            p.grad = self.flat_grad[off : off + n].view_as(p)
            off += n
        lo = rank * self.shard_size
        self.slice = slice(lo, lo + self.shard_size)
        if stage == 0:
            self.shard = nn.Parameter(self.flat_param)  # shares storage: the optimizer updates the model
            self.shard.grad = self.flat_grad
        else:
            self.shard = nn.Parameter(self.flat_param[self.slice].clone())
            self.shard.grad = self.flat_grad[self.slice] if stage == 1 else torch.zeros_like(self.shard)
        self.hits = 0
        self.expected = 0
        self.work: dist.Work | None = None
        self.unsharded = True
        self.gather_work: dist.Work | None = None
        # Sharded gradients (stage >= 2 with overlap): whether flat_grad's storage is allocated, holds
        # gradients not yet reduced, and the reduction in flight ((work or None, received shard)).
        self.grad_allocated, self.dirty = True, False
        self.pending: tuple[dist.Work | None, torch.Tensor] | None = None
        # ZeRO-3: the dtype the shard travels in when gathered (bf16 halves the traffic of weights
        # that only GEMMs under bf16 autocast read), and the landing buffer of a low-precision gather.
        self.gather_dtype = torch.float32
        self.gather_buf: torch.Tensor | None = None

    @property
    def shard_grad(self) -> torch.Tensor:
        """The fp32 gradient of the optimizer's shard (set at construction, never None)."""
        assert self.shard.grad is not None
        return self.shard.grad

    def grad_shard(self) -> torch.Tensor:
        """This rank's unique slice of the reduced gradient."""
        return self.shard_grad if self.stage >= 1 else self.flat_grad[self.slice]

    # ZeRO-3: the flat parameter's storage is freed between uses; the views stay valid objects.
    def free(self) -> None:
        if self.unsharded:
            self.flat_param.untyped_storage().resize_(0)
            self.unsharded = False

    def start_gather(self, group) -> None:
        if self.unsharded or self.gather_work is not None:
            return
        self.flat_param.untyped_storage().resize_(self.flat_param.numel() * self.flat_param.element_size())
        shard = self.shard.detach()
        if self.gather_dtype != torch.float32:
            shard = shard.to(self.gather_dtype)
            if group is not None:
                self.gather_buf = torch.empty(
                    self.flat_param.shape, dtype=self.gather_dtype, device=shard.device
                )
        if group is None:
            self.flat_param.copy_(shard)
        else:
            out = self.flat_param if self.gather_buf is None else self.gather_buf
            self.gather_work = all_gather_single(out, shard, group=group, async_op=True)

    def discard(self) -> None:
        """Drop the gathered copy (waiting for an in-flight prefetch first): the shard is the truth."""
        if self.gather_work is not None:
            self.gather_work.wait()
            self.gather_work = None
            self.unsharded = True
        self.gather_buf = None
        self.free()

    def alloc_grad(self) -> None:
        """Give flat_grad (and so every parameter's .grad view) its storage back, zeroed."""
        if not self.grad_allocated:
            self.flat_grad.untyped_storage().resize_(self.flat_grad.numel() * self.flat_grad.element_size())
            self.flat_grad.zero_()
            self.grad_allocated = True

    def free_grad(self) -> None:
        if self.grad_allocated:
            self.flat_grad.untyped_storage().resize_(0)
            self.grad_allocated = False

    def land_reduction(self) -> None:
        """Wait for the reduction in flight and add its shard into the fp32 gradient shard."""
        assert self.pending is not None
        work, recv = self.pending
        if work is not None:
            work.wait()
        self.shard_grad.add_(recv)
        self.pending = None

    def finish_gather(self, group) -> None:
        self.start_gather(group)
        if self.gather_work is not None:
            self.gather_work.wait()
            self.gather_work = None
        if self.gather_buf is not None:
            self.flat_param.copy_(self.gather_buf)
            self.gather_buf = None
        self.unsharded = True


class ZeroDataParallel:
    """ZeRO-0/1/2/3 over `group` (DP x CP) for the parameters of `modules` (a rank's model chunks).

    tp_sharded: the parameters split over TP (the others are replicated on every TP rank).
    tp_group: under sequence parallelism the gradients of TP-replicated parameters (norms) are
    partial sums over sequence shards; they are all-reduced over TP before the data-parallel reduction.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        group: dist.ProcessGroup | None,
        *,
        stage: int = 1,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        tp_sharded: Collection[nn.Parameter] = (),
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        backward_prefetch: bool = True,
        gather_dtype: torch.dtype = torch.float32,
    ):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {stage}")
        self.group, self.stage, self.overlap = group, stage, overlap
        self.backward_prefetch = backward_prefetch
        self.tp_group, self.sp = tp_group, sequence_parallel
        self._tp_sharded = {id(p) for p in tp_sharded}
        self.world, self.rank = group_size(group), group_rank(group)
        limit = max(1, int(bucket_mb * 2**20 / 4))
        self.buckets: list[_Bucket] = []
        self.units: list[tuple[nn.Module | None, list[_Bucket]]] = []  # (block or None for the rest, buckets)
        seen: set[int] = set()
        for mod in modules:
            layers = getattr(mod, "layers", None)
            blocks = list(layers.values()) if isinstance(layers, nn.ModuleDict) else []
            block_params = {id(p) for b in blocks for p in b.parameters()}
            rest = [p for p in mod.parameters() if id(p) not in block_params]
            for unit_mod, params in [(b, list(b.parameters())) for b in blocks] + [(None, rest)]:
                params = [p for p in params if p.requires_grad and id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    self.units.append((unit_mod, self._make_buckets(params, limit)))
        # Stage >= 2 with overlap: gradients reduced per micro-batch, full buffers freed in between.
        self.shard_grads = stage >= 2 and overlap
        self._inflight: list[_Bucket] = []  # buckets whose per-micro-batch reduction is in flight
        for p_bucket in self.buckets:
            for p in p_bucket.params:
                p.register_post_accumulate_grad_hook(self._make_hook(p_bucket))
                if self.shard_grads:
                    p.register_hook(self._make_grad_arriving_hook(p_bucket))
            if self.shard_grads:
                p_bucket.free_grad()
        if stage == 3:
            # Block matrices are read only by GEMMs, which under bf16 autocast see bf16 weights
            # anyway: gathering them in bf16 changes nothing there and halves their traffic. Norm
            # weights and the chunk's embedding/head stay fp32.
            for unit_mod, buckets in self.units:
                for b in buckets:
                    if unit_mod is not None and b.decay:
                        b.gather_dtype = gather_dtype
            self._install_zero3_hooks()

    def _make_buckets(self, params: list[nn.Parameter], limit: int) -> list[_Bucket]:
        out = []
        for decay, repl in ((True, False), (True, True), (False, False), (False, True)):
            chosen = [p for p in params if (p.ndim >= 2) == decay and (id(p) not in self._tp_sharded) == repl]
            cur: list[nn.Parameter] = []
            for p in chosen:
                if cur and sum(q.numel() for q in cur) + p.numel() > limit:
                    out.append(_Bucket(cur, decay, repl, self.world, self.rank, self.stage))
                    cur = []
                cur.append(p)
            if cur:
                out.append(_Bucket(cur, decay, repl, self.world, self.rank, self.stage))
        self.buckets += out
        return out

    # ------------------------------------------------------------------ gradients
    def _make_hook(self, bucket: _Bucket):
        def hook(_p: torch.Tensor) -> None:
            bucket.hits += 1
            if self.shard_grads:
                if bucket.hits == len(bucket.params):  # this micro-batch's gradients all landed
                    self._reduce_microbatch(bucket)
            elif self.overlap and bucket.expected and bucket.hits == bucket.expected:
                self._reduce(bucket)

        return hook

    # Sharded gradients: a parameter's gradient is about to be accumulated into its view of the
    # bucket's flat_grad, whose storage may be freed, or still read by the last reduction.
    def _make_grad_arriving_hook(self, bucket: _Bucket):
        def hook(grad: torch.Tensor) -> None:
            if bucket.pending is not None:
                bucket.land_reduction()
                self._inflight.remove(bucket)
                bucket.flat_grad.zero_()
            bucket.alloc_grad()
            bucket.dirty = True

        return hook

    def _reduce_microbatch(self, b: _Bucket) -> None:
        """Launch the reduce-scatter of what b accumulated since its last reduction, then land the
        oldest reductions beyond MAX_INFLIGHT and free their full buffers."""
        b.hits, b.dirty = 0, False
        if b.tp_replicated and self.sp:
            all_reduce(b.flat_grad, self.tp_group)
        if self.group is None:
            b.pending = (None, b.flat_grad[b.slice].clone())
        else:
            recv = torch.empty_like(b.shard_grad)
            b.pending = (reduce_scatter_single(recv, b.flat_grad, group=self.group, async_op=True), recv)
        self._inflight.append(b)
        while len(self._inflight) > MAX_INFLIGHT:
            self._land_oldest()

    def _land_oldest(self) -> None:
        b = self._inflight.pop(0)
        b.land_reduction()
        b.free_grad()

    def _reduce(self, b: _Bucket) -> None:
        if b.work is not None or b.expected == -1:
            return
        if b.tp_replicated and self.sp:
            all_reduce(b.flat_grad, self.tp_group)
        b.expected = -1  # launched for this step
        if self.group is None:
            if self.stage >= 2:
                b.shard_grad.copy_(b.flat_grad[b.slice])
            return
        if self.stage <= 1:
            b.work = dist.all_reduce(b.flat_grad, group=self.group, async_op=True)
        else:
            b.work = reduce_scatter_single(b.shard_grad, b.flat_grad, group=self.group, async_op=True)

    def begin_step(self, n_microbatches: int) -> None:
        """Arm the hooks: each bucket reduces once its parameters got n_microbatches gradients each
        (with sharded gradients: after each micro-batch)."""
        for b in self.buckets:
            b.hits, b.expected, b.work = 0, len(b.params) * n_microbatches, None

    def finish_grad_sync(self) -> None:
        """Reduce the buckets the hooks did not launch (overlap off, unused parameters), then wait."""
        if self.shard_grads:
            for b in self.buckets:
                if b.dirty:  # gradients since its last reduction (a parameter without one held it back)
                    self._reduce_microbatch(b)
            while self._inflight:
                self._land_oldest()
            return
        for b in self.buckets:
            self._reduce(b)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None

    def zero_grad(self) -> None:
        for b in self.buckets:
            if b.grad_allocated:
                b.flat_grad.zero_()
            if self.stage >= 2:
                b.shard_grad.zero_()

    def grad_norm_sq_local(self, tp_rank: int) -> torch.Tensor:
        """Sum of squares of this rank's unique gradient elements (TP-replicated ones on tp rank 0)."""
        total = torch.zeros((), dtype=torch.float32, device=self.buckets[0].flat_grad.device)
        for b in self.buckets:
            if b.tp_replicated and tp_rank != 0:
                continue
            total += b.grad_shard().square().sum()
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        return total

    def scale_grads(self, factor: float | torch.Tensor) -> None:
        for b in self.buckets:
            (b.flat_grad if self.stage == 0 else b.shard_grad).mul_(factor)

    # ------------------------------------------------------------------ parameters
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups over the fp32 shards: decay for matrices, none for norms."""
        decay = [b.shard for b in self.buckets if b.decay]
        no_decay = [b.shard for b in self.buckets if not b.decay]
        return [
            g
            for g in (
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]

    def after_optimizer_step(self) -> None:
        """Bring the updated shards back into the model's parameters (all-gather; nothing at stages 0, 3)."""
        if self.stage == 0:
            return
        if self.stage == 3:  # blocks gather on demand; the rest (embedding, norm, head) stays whole
            for unit_mod, buckets in self.units:
                if unit_mod is not None:  # a prefetched copy would hold the pre-step values
                    for b in buckets:
                        b.discard()
                else:
                    for b in buckets:
                        b.unsharded = False
                        b.finish_gather(self.group)
            return
        works = []
        for b in self.buckets:
            if self.group is None:
                b.flat_param.copy_(b.shard.detach())
            else:
                works.append(
                    all_gather_single(b.flat_param, b.shard.detach(), group=self.group, async_op=True)
                )
        for w in works:
            w.wait()

    @contextlib.contextmanager
    def unsharded(self):
        """All parameters gathered (ZeRO-3) for the duration, e.g. to read a full state dict."""
        if self.stage == 3:
            for b in self.buckets:
                b.finish_gather(self.group)
        try:
            yield
        finally:
            if self.stage == 3:
                for unit_mod, buckets in self.units:
                    if unit_mod is not None:
                        for b in buckets:
                            b.free()

    # ------------------------------------------------------------------ ZeRO-3 hooks
    def _install_zero3_hooks(self) -> None:
        blocks = [(m, bs) for m, bs in self.units if m is not None]
        for i, (mod, buckets) in enumerate(blocks):
            nxt = blocks[i + 1][1] if i + 1 < len(blocks) else []
            # Backward runs the blocks in reverse: block i-1 is next (within a model chunk; across
            # pipeline chunks it comes later in the schedule, still in the same step).
            prv = blocks[i - 1][1] if i > 0 and self.backward_prefetch else []

            def pre_fwd(_m, _args, buckets=buckets, nxt=nxt):
                for b in buckets:
                    b.finish_gather(self.group)
                for b in nxt:  # prefetch: the next block's gather runs during this block's compute
                    b.start_gather(self.group)

            def post_fwd(_m, _args, _out, buckets=buckets):
                for b in buckets:
                    b.free()

            def pre_bwd(_m, _grad_out, buckets=buckets, prv=prv):
                for b in buckets:
                    b.finish_gather(self.group)
                for b in prv:  # prefetch: block i-1's gather runs during this block's backward
                    b.start_gather(self.group)

            mod.register_forward_pre_hook(pre_fwd)
            mod.register_forward_hook(post_fwd)
            mod.register_full_backward_pre_hook(pre_bwd)
            n_params = sum(len(b.params) for b in buckets)
            counter = {"n": 0}

            def post_bwd(_p, buckets=buckets, n_params=n_params, counter=counter):
                counter["n"] += 1
                if counter["n"] == n_params:  # every gradient of this block landed: free it again
                    counter["n"] = 0
                    for b in buckets:
                        b.free()

            for b in buckets:
                for p in b.params:
                    p.register_post_accumulate_grad_hook(post_bwd)
        for _m, buckets in blocks:
            for b in buckets:
                b.free()
