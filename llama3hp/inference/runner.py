"""Runs a step: the scheduler's plan as tensors, the model's forward, the logits to sample from.

`build_inputs(plan)` turns a `Plan` into `StepInputs`: plain CPU tensors (token ids, positions,
cache slots, the decode sequences' block tables, the prefill chunks' segments), which is also
what rank 0 broadcasts to the other tensor-parallel ranks. `ModelRunner.execute(inputs)` makes
the copy-on-write block copies, binds the `AttentionMetadata` to the cache and calls the model,
`Transformer.forward` itself, then asks its `HeadOutput` for the logits of the sampled rows only.

On CUDA a decode-only step (no prefill in it: the steady state) replays a CUDA graph captured for
the smallest batch-size bucket that holds it (1, 2, 4, 8, 16, 32, then multiples of 32): one
launch instead of hundreds of kernel launches, the difference between launch-bound and
bandwidth-bound decoding at small batch. Graphs are captured lazily per bucket, with the block
tables sized for `max_model_len` and padding rows writing to the padding block. A step with
prefill runs eagerly.

Shape legend: N tokens of a step, S decode sequences, P block-table width, C prefill chunks,
R sampled rows, V vocabulary, B a graph's batch bucket.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llama3hp.inference.kv_cache import BLOCK_SIZE, AttentionMetadata, KVCache, blocks_for
from llama3hp.inference.scheduler import Plan
from llama3hp.model.llama import Transformer


@dataclass
class StepInputs:
    """One step's model inputs on the host (see the module docstring)."""

    tokens: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    slot_mapping: torch.Tensor  # int64 [N]
    n_decode: int
    block_tables: torch.Tensor | None  # int32 [S, P]
    context_lens: torch.Tensor | None  # int32 [S]
    max_context_len: int
    cu_seqlens_q: torch.Tensor | None  # int32 [C + 1]
    cu_seqlens_k: torch.Tensor | None  # int32 [C + 1]
    q_pos_offsets: torch.Tensor | None  # int32 [C]
    max_seqlen_q: int
    max_seqlen_k: int
    gather_slots: torch.Tensor | None  # int64 [sum of contexts]
    logits_rows: torch.Tensor  # int64 [R'] the distinct rows whose logits are sampled
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        return self.cu_seqlens_q is None


def _slots(blocks: list[int], start: int, stop: int) -> list[int]:
    return [blocks[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE for t in range(start, stop)]


def build_inputs(plan: Plan, logits_rows: list[int]) -> StepInputs:
    """The plan's tokens, decode sequences first, then the prefill chunks packed."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for seq in plan.decode:
        pos = len(seq.tokens) - 1
        tokens.append(seq.tokens[pos])
        positions.append(pos)
        slots += _slots(seq.blocks, pos, pos + 1)
    bt = cl = None
    max_ctx = 0
    if plan.decode:
        width = max(len(s.blocks) for s in plan.decode)
        bt = torch.zeros(len(plan.decode), width, dtype=torch.int32)
        for i, s in enumerate(plan.decode):
            bt[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        cl = torch.tensor([len(s.tokens) for s in plan.decode], dtype=torch.int32)
        max_ctx = int(cl.max())
    cu_q = cu_k = offs = gather = None
    max_q = max_k = 0
    if plan.chunks:
        q_lens, k_lens, starts, gather_list = [], [], [], []
        for ch in plan.chunks:
            seq, end = ch.seq, ch.start + ch.length
            tokens += seq.tokens[ch.start : end]
            positions += range(ch.start, end)
            slots += _slots(seq.blocks, ch.start, end)
            q_lens.append(ch.length)
            k_lens.append(end)
            starts.append(ch.start)
            gather_list += _slots(seq.blocks, 0, end)
        cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
        offs = torch.tensor(starts, dtype=torch.int32)
        max_q, max_k = max(q_lens), max(k_lens)
        if any(starts):  # some chunk continues a cached prefix: read every context from the cache
            gather = torch.tensor(gather_list, dtype=torch.int64)
    return StepInputs(
        torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
        torch.tensor(slots, dtype=torch.int64), len(plan.decode), bt, cl, max_ctx, cu_q, cu_k, offs,
        max_q, max_k, gather, torch.tensor(logits_rows, dtype=torch.int64), plan.copies,
    )  # fmt: skip


def graph_bucket(n: int) -> int:
    """The CUDA-graph batch size that holds n decode sequences."""
    for b in (1, 2, 4, 8, 16, 32):
        if n <= b:
            return b
    return -(-n // 32) * 32


class _DecodeGraph:
    """A decode step for B sequences captured once: static inputs, replayed with new contents."""

    def __init__(self, runner: ModelRunner, B: int, pool):
        dev, P = runner.device, blocks_for(runner.max_model_len)
        self.B = B
        self.tokens = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(B, dtype=torch.int64, device=dev)  # padding rows: block 0
        self.block_tables = torch.zeros(B, P, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(B, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            self.slots, B, self.block_tables, self.context_lens, max_context_len=runner.max_model_len
        )
        for _ in range(2):  # warm-up outside the graph: Triton compiles, allocator settles
            runner._forward(self.tokens, self.positions, meta, None)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = runner._forward(self.tokens, self.positions, meta, None)

    def run(self, inp: StepInputs) -> torch.Tensor:
        S = inp.n_decode
        assert inp.block_tables is not None and inp.context_lens is not None
        self.tokens[:S].copy_(inp.tokens, non_blocking=True)
        self.positions[:S].copy_(inp.positions, non_blocking=True)
        self.slots[:S].copy_(inp.slot_mapping, non_blocking=True)
        self.slots[S:].zero_()
        self.block_tables.zero_()
        self.block_tables[:S, : inp.block_tables.shape[1]].copy_(inp.block_tables, non_blocking=True)
        self.context_lens[:S].copy_(inp.context_lens, non_blocking=True)
        self.context_lens[S:].fill_(1)
        self.graph.replay()
        return self.logits[:S]


class ModelRunner:
    """The model with its KV cache on one rank: `execute(StepInputs)` -> logits [R', V] fp32 of
    `inputs.logits_rows`. With a tensor-parallel `group`, rank 0 broadcasts each step's inputs
    first and every rank runs the same forward (`serve_worker` on the others)."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        device: torch.device,
        *,
        max_model_len: int,
        amp_dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
        group: dist.ProcessGroup | None = None,
    ):
        self.model, self.cache, self.device = model, cache, device
        self.max_model_len, self.amp_dtype, self.group = max_model_len, amp_dtype, group
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[int, _DecodeGraph] = {}
        self._pool: tuple[int, int] | None = None
        self.max_graph_batch = 256

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, tokens, positions, meta: AttentionMetadata, rows) -> torch.Tensor:
        self.cache.meta = meta
        try:
            with self._autocast():
                out = self.model(tokens[None], positions=positions[None])
                logits = out.logits(rows) if rows is not None else out.logits()[0]
            return logits.float()
        finally:
            self.cache.meta = None

    @torch.inference_mode()
    def execute(self, inp: StepInputs) -> torch.Tensor:
        if self.group is not None and dist.get_rank(self.group) == 0:
            dist.broadcast_object_list([inp], group=self.group, group_src=0)
        return self._execute(inp)

    def _execute(self, inp: StepInputs) -> torch.Tensor:
        if inp.copies:
            self.cache.copy_blocks([s for s, _ in inp.copies], [d for _, d in inp.copies])
        if self.cuda_graphs and inp.decode_only and inp.n_decode <= self.max_graph_batch:
            graph = self._graph(graph_bucket(inp.n_decode))
            if graph is not None:
                logits = graph.run(inp)
                return logits.index_select(0, inp.logits_rows.to(self.device))
        dev = self.device
        to = lambda t: None if t is None else t.to(dev, non_blocking=True)
        meta = AttentionMetadata(
            inp.slot_mapping.to(dev, non_blocking=True), inp.n_decode, to(inp.block_tables), to(inp.context_lens), inp.max_context_len,
            to(inp.cu_seqlens_q), to(inp.cu_seqlens_k), to(inp.q_pos_offsets), inp.max_seqlen_q,
            inp.max_seqlen_k, to(inp.gather_slots),
        )  # fmt: skip
        return self._forward(to(inp.tokens), to(inp.positions), meta, to(inp.logits_rows))

    def _graph(self, B: int) -> _DecodeGraph | None:
        if B not in self._graphs:
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                self._graphs[B] = _DecodeGraph(self, B, self._pool)
            except Exception as e:  # noqa: BLE001 - an uncapturable op must not take serving down
                warnings.warn(f"CUDA graph capture failed for batch {B}, decoding eagerly: {e}", stacklevel=2)
                self.cuda_graphs = False
                return None
        return self._graphs[B]

    # ---------------------------------------------------------------- tensor parallelism

    @torch.inference_mode()
    def serve_worker(self) -> None:
        """Ranks other than 0: run every step rank 0 broadcasts, until it broadcasts None."""
        assert self.group is not None
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, group=self.group, group_src=0)
            if box[0] is None:
                return
            self._execute(box[0])

    def stop_workers(self) -> None:
        """Rank 0: release the other ranks from `serve_worker`."""
        if self.group is not None:
            dist.broadcast_object_list([None], group=self.group, group_src=0)
