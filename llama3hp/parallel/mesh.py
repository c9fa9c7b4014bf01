"""The 4D device mesh: degrees, rank layout and process groups, in the paper's order [TP, CP, PP, DP].

TP is innermost (consecutive ranks, one NVLink node), DP outermost:
    rank = tp_rank + tp * (cp_rank + cp * (pp_rank + pp * dp_rank))
The degree arithmetic (`ParallelDims`) is pure and tested without processes; `build_mesh` turns it
into gloo (CPU) or NCCL (CUDA) process groups held by a `DeviceMesh4D` object that is passed
explicitly (no module-level parallel state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# The grid order, innermost first: the one place it is written.
DIM_ORDER = ("tp", "cp", "pp", "dp")
PP_SCHEDULES = ("1f1b", "interleaved")
GATHER_DTYPES = ("float32", "bfloat16")


@dataclass
class ParallelConfig:
    """How a job is split over ranks (TOML section [parallel])."""

    tp: int = 1  # tensor-parallel degree (heads and FFN columns; within a node)
    cp: int = 1  # context-parallel degree (each row split into 2*cp chunks)
    pp: int = 1  # pipeline-parallel stages (physical)
    dp: int = -1  # data-parallel degree (-1: world_size / (tp*cp*pp))
    sequence_parallel: bool = True  # with tp > 1: norms and residual on sequence shards
    tp_overlap: bool = False  # split TP all-gather / reduce-scatter into chunks pipelined with GEMMs
    tp_overlap_chunks: int = 2  # chunks per rank shard when tp_overlap
    # with tp > 1: the vocab-parallel loss chunk by chunk of rows (the fused cross-entropy kernel on
    # CUDA), never holding [N, V/tp] logits; False materialises them per shard (tensor.py, memory)
    tp_chunked_loss: bool = True
    cp_overlap: bool = True  # with cp > 1: K/V all-gather in flight during the diagonal attention blocks
    zero_stage: int = (
        1  # 0: replicated optimizer, 1: sharded optimizer, 2: + sharded grads, 3: + sharded params
    )
    dp_bucket_mb: float = 25.0  # gradient bucket size (fp32 MiB) for reduce-scatter during backward
    # reduce each bucket as soon as backward fills it; stages 2-3 then reduce after every micro-batch
    # and keep only gradient shards (without overlap: full buffers, one reduction at the end)
    dp_overlap: bool = True
    zero3_backward_prefetch: bool = True  # ZeRO-3: gather block i-1's parameters during block i's backward
    # ZeRO-3: dtype the blocks' matrices are all-gathered in; "bfloat16" halves that traffic and is
    # lossless for bf16-autocast GEMMs (training.dtype must then be bf16)
    zero3_gather_dtype: str = "float32"
    pp_schedule: str = "1f1b"  # "1f1b" | "interleaved"
    pp_virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule; 1 for 1f1b)
    pp_microbatches: int = 0  # micro-batches per step through the pipeline (0: the accumulation count)
    pp_edge_cost: float = 1.0  # layers' worth of work of the embedding (first stage) and head+loss (last)
    pp_stage_layers: list[int] = field(default_factory=list)  # explicit layers per virtual stage (overrides)


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of the four dimensions and the arithmetic on them (no process groups)."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def sizes(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in DIM_ORDER}

    def coords(self, rank: int) -> dict[str, int]:
        """{tp, cp, pp, dp} coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size} ranks")
        out, rest = {}, rank
        for d in DIM_ORDER:
            out[d], rest = rest % getattr(self, d), rest // getattr(self, d)
        return out

    def rank_of(self, **coords: int) -> int:
        rank, stride = 0, 1
        for d in DIM_ORDER:
            rank += coords.get(d, 0) * stride
            stride *= getattr(self, d)
        return rank

    def groups(self, dims: tuple[str, ...]) -> list[list[int]]:
        """Every group of ranks that differ only along `dims` (ranks ordered innermost-first)."""
        others = [d for d in DIM_ORDER if d not in dims]
        out = []
        for fixed in _product([range(getattr(self, d)) for d in others]):
            base = dict(zip(others, fixed))
            members = [
                self.rank_of(**base, **dict(zip(dims, c)))
                for c in _product([range(getattr(self, d)) for d in reversed(dims)], reverse=True)
            ]
            out.append(members)
        return out


def _product(ranges: list[range], reverse: bool = False) -> list[tuple[int, ...]]:
    """Cartesian product; with reverse=True the tuples are reversed so the first index varies fastest."""
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [t + (i,) for t in out for i in r]
    return [t[::-1] for t in out] if reverse else out


def resolve_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """The degrees of `cfg` on `world_size` ranks, dp inferred when -1; one clear error per bad layout."""
    for name in ("tp", "cp", "pp"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"parallel.{name} must be >= 1, got {getattr(cfg, name)}")
    inner = cfg.tp * cfg.cp * cfg.pp
    dp = cfg.dp
    if dp == -1:
        if world_size % inner:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*cp*pp = {inner}: change the degrees or the number of ranks"
            )
        dp = world_size // inner
    if dp < 1 or inner * dp != world_size:
        raise ValueError(
            f"world size {world_size} != tp*cp*pp*dp = {cfg.tp}*{cfg.cp}*{cfg.pp}*{dp} = {inner * dp}: "
            "set parallel.dp=-1 to infer it or fix the degrees"
        )
    return ParallelDims(cfg.tp, cfg.cp, cfg.pp, dp)


def validate_layout(cfg: ParallelConfig, dims: ParallelDims, model_args, seq_len: int | None = None) -> None:
    """Raise one clear ValueError for a layout the model or batch cannot be split by."""
    a = model_args
    if a.n_heads % dims.tp:
        raise ValueError(f"n_heads ({a.n_heads}) is not divisible by tp ({dims.tp}): pick tp dividing it")
    if a.n_kv_heads % dims.tp:
        raise ValueError(
            f"n_kv_heads ({a.n_kv_heads}) is not divisible by tp ({dims.tp}): pick tp dividing it"
        )
    if a.ffn_dim % dims.tp or a.vocab_size % dims.tp:
        raise ValueError(
            f"ffn_dim ({a.ffn_dim}) and vocab_size ({a.vocab_size}) must be divisible by tp ({dims.tp})"
        )
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.zero3_gather_dtype not in GATHER_DTYPES:
        raise ValueError(
            f"parallel.zero3_gather_dtype must be one of {', '.join(GATHER_DTYPES)}, got {cfg.zero3_gather_dtype!r}"
        )
    if cfg.pp_schedule not in PP_SCHEDULES:
        raise ValueError(f"parallel.pp_schedule must be one of {PP_SCHEDULES}, got {cfg.pp_schedule!r}")
    if cfg.pp_schedule == "1f1b" and cfg.pp_virtual_stages != 1:
        raise ValueError("parallel.pp_virtual_stages > 1 needs pp_schedule='interleaved'")
    if cfg.tp_overlap_chunks < 1:
        raise ValueError(f"parallel.tp_overlap_chunks must be >= 1, got {cfg.tp_overlap_chunks}")
    from llama3hp.parallel.pipeline import partition_layers

    partition_layers(a.n_layers, dims.pp, cfg.pp_virtual_stages, cfg.pp_edge_cost, cfg.pp_stage_layers)
    if seq_len is not None:
        if seq_len % (2 * dims.cp):
            raise ValueError(
                f"seq_len ({seq_len}) is not divisible by 2*cp ({2 * dims.cp}): context parallelism splits each row into 2*cp chunks"
            )
        local = seq_len // dims.cp
        split = dims.tp * (cfg.tp_overlap_chunks if cfg.tp_overlap else 1)
        if dims.tp > 1 and cfg.sequence_parallel and local % split:
            raise ValueError(
                f"seq_len/cp ({local}) is not divisible by tp (x tp_overlap_chunks with tp_overlap) = {split}: "
                "sequence parallelism shards each row over the TP ranks"
            )


@dataclass
class DeviceMesh4D:
    """This rank's place in the mesh and its process groups (None for a dimension of size 1).

    `dp_cp` is the group over which parameters are replicated and gradients reduced: DP and CP ranks
    hold the same parameters and see different tokens.
    """

    dims: ParallelDims
    rank: int
    tp_group: dist.ProcessGroup | None
    cp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    dp_cp_group: dist.ProcessGroup | None
    pp_ranks: list[int]  # global ranks of this rank's pipeline, by stage
    device: torch.device
    # All ranks of the layout (0 .. world_size-1): job-wide collectives and checkpoints. None on one
    # process; the default group when the layout spans every launched rank.
    world_group: dist.ProcessGroup | None = None

    @property
    def coords(self) -> dict[str, int]:
        return self.dims.coords(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def cp_rank(self) -> int:
        return self.coords["cp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def dp_cp_rank(self) -> int:
        return self.coords["cp"] + self.dims.cp * self.coords["dp"]


def build_mesh(cfg: ParallelConfig, device: torch.device | str | None = None) -> DeviceMesh4D | None:
    """Process groups for `cfg` over ranks 0..tp*cp*pp*dp-1 of the default group.

    Every rank of the default group must call this (group creation is collective); a rank beyond the
    layout's world size gets None. With no default group the mesh is one process (all groups None).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.dp == -1:
        dims = resolve_dims(cfg, world)
    else:
        dims = resolve_dims(cfg, cfg.tp * cfg.cp * cfg.pp * cfg.dp)
        if dims.world_size > world:
            raise ValueError(f"layout needs {dims.world_size} ranks but only {world} were launched")
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    mine: dict[tuple[str, ...], dist.ProcessGroup | None] = {}
    pp_ranks = [rank] if rank < dims.world_size else []
    for key in (("tp",), ("cp",), ("pp",), ("dp",), ("cp", "dp")):
        for members in dims.groups(key):
            # new_group is collective over the default group: every rank creates every group.
            g = dist.new_group(members) if world > 1 and len(members) > 1 else None
            if rank in members:
                mine[key] = g
                if key == ("pp",):
                    pp_ranks = members
    world_group = None
    if world > 1:
        members = list(range(dims.world_size))
        world_group = dist.group.WORLD if dims.world_size == world else dist.new_group(members)
    if rank >= dims.world_size:
        return None
    return DeviceMesh4D(
        dims,
        rank,
        mine[("tp",)],
        mine[("cp",)],
        mine[("pp",)],
        mine[("dp",)],
        mine[("cp", "dp")],
        pp_ranks,
        torch.device(device),
        world_group,
    )
