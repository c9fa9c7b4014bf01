"""The paged KV cache: fixed-size blocks of K/V, a reference-counted allocator, per-step metadata.

Memory: one K and one V tensor per layer, cut into blocks of BLOCK_SIZE (16) tokens:
k, v [n_layers, n_blocks, BLOCK_SIZE, Hk, Dh] (Hk: this rank's KV heads under tensor parallelism).
A sequence owns a block table (the ids of its blocks, in order); token t lives in block
table[t // 16] at row t % 16, its slot = block * 16 + row. Block 0 is never handed out: padding
tokens (a CUDA graph's spare rows) write there, and padded block tables point there.

Sharing: blocks are reference-counted. The n samples of one prompt share the prompt's blocks;
the first sample to write into a shared block (the prompt's partly filled last block) gets a
private copy first (copy-on-write); full prompt blocks stay shared until every sample is done.

Admission (`BlockAllocator.reserve`): a request enters only when every block it can ever need
(prompt plus max_tokens, for all its samples) is free and not promised to another request, so a
running sequence never waits for memory and nothing is ever swapped out.

Shape legend: L layers, NB blocks, BS = BLOCK_SIZE, Hk KV heads (local), Dh head dim, N tokens of a
step, S decode sequences, P block-table width.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16
NULL_BLOCK = 0  # written by padding rows, read by nobody


def bytes_per_block(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block of BLOCK_SIZE tokens takes in K and V over all layers (8B bf16: 128 KiB)."""
    return 2 * n_layers * BLOCK_SIZE * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for(n_tokens: int) -> int:
    return -(-n_tokens // BLOCK_SIZE)


class KVCache:
    """K and V of every layer in blocks (module docstring), and the metadata of the step being run.

    The cache-aware attention modules (`llama3hp.inference.attention.CachedAttention`) share one
    KVCache: the runner binds each step's `AttentionMetadata` to `meta` before the model's forward."""

    def __init__(
        self,
        n_layers: int,
        n_blocks: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if n_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is the padding block), got {n_blocks}")
        shape = (n_layers, n_blocks, BLOCK_SIZE, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_blocks = n_blocks
        self.meta: AttentionMetadata | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v) blocks [NB, BS, Hk, Dh]."""
        return self.k[i], self.v[i]

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [N, Hk, Dh] of layer i at slots int64 [N]."""
        kc, vc = self.layer(i)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(vc.dtype))

    def gather(self, i: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's k, v at slots int64 [M] -> [M, Hk, Dh] each."""
        kc, vc = self.layer(i)
        return (kc.view(-1, *kc.shape[2:]).index_select(0, slots),
                vc.view(-1, *vc.shape[2:]).index_select(0, slots))  # fmt: skip

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write: blocks src[j] -> dst[j] in every layer."""
        if src:
            s = torch.tensor(src, device=self.k.device)
            d = torch.tensor(dst, device=self.k.device)
            self.k[:, d] = self.k[:, s]
            self.v[:, d] = self.v[:, s]


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each attends to. The step's N tokens are the decode
    tokens first (one per running sequence), then the prefill chunks, packed.

    Built on the host by the runner, moved to the device once per step (or copied into a CUDA
    graph's static buffers)."""

    slot_mapping: torch.Tensor  # int64 [N]: cache slot of each token (padding rows: block 0)
    n_decode: int  # the first n_decode tokens are decode queries
    block_tables: torch.Tensor | None = None  # int32 [S, P]: the decode sequences' blocks
    context_lens: torch.Tensor | None = None  # int32 [S]: their cached tokens, the new one included
    max_context_len: int = 0  # an upper bound on context_lens (sizes the decode kernel, no sync)
    # Prefill chunks, over the tokens after the decode ones:
    cu_seqlens_q: torch.Tensor | None = None  # int32 [C + 1]: the chunks' query tokens
    cu_seqlens_k: torch.Tensor | None = None  # int32 [C + 1]: each chunk's whole context (cached + new)
    q_pos_offsets: torch.Tensor | None = None  # int32 [C]: tokens cached before each chunk
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # int64 [sum of contexts]: the cache slots of every chunk's whole context, in order; None when
    # no chunk has cached tokens before it (its keys are this step's own: no gather needed).
    gather_slots: torch.Tensor | None = None


class BlockAllocator:
    """Free list and reference counts of blocks 1..NB-1, and the blocks promised to admitted
    requests (`reserved`), which only those requests may take."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.free: deque[int] = deque(range(1, n_blocks))
        self.refs = [0] * n_blocks
        self.reserved = 0

    @property
    def usable(self) -> int:
        """Blocks a request can ever hold (all but the padding block)."""
        return self.n_blocks - 1

    @property
    def n_used(self) -> int:
        return self.usable - len(self.free)

    def can_reserve(self, n: int) -> bool:
        return len(self.free) - self.reserved >= n

    def reserve(self, n: int) -> bool:
        """Promise n blocks to a request if they are free and unpromised."""
        if not self.can_reserve(n):
            return False
        self.reserved += n
        return True

    def release(self, n: int) -> None:
        """Give back n promised blocks that were never taken."""
        assert 0 <= n <= self.reserved, (n, self.reserved)
        self.reserved -= n

    def take(self) -> int:
        """A block out of a reservation, with one reference."""
        assert self.reserved > 0 and self.free, "allocation outside a reservation"
        self.reserved -= 1
        b = self.free.popleft()
        self.refs[b] = 1
        return b

    def incref(self, b: int) -> None:
        self.refs[b] += 1

    def decref(self, b: int) -> None:
        self.refs[b] -= 1
        assert self.refs[b] >= 0, b
        if self.refs[b] == 0:
            self.free.append(b)
