"""Context parallelism, the Llama 3 paper's way: all-gather K/V, keep queries local.

Each row of T tokens is cut into 2*cp chunks of c = T/(2cp); CP rank i holds chunks i and
2cp-1-i (an early and a late chunk, so every rank does the same causal-attention work). Attention
all-gathers K and V over the CP group (cheap with 8 KV heads) and attends the rank's queries to
every gathered key under the document mask, comparing GLOBAL positions; backward reduce-scatters
dK/dV. Packed documents of any length work: masks come from the global `cu_seqlens`, so a document
may cross chunk and rank borders. RoPE uses each local token's global document position.

Shape legend: B rows, T global row length, T_l = T/cp local tokens, H/Hk query/KV heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import llama3hp.kernels as K
from llama3hp.kernels.attention import attention_varlen, build_cp_query_segments
from llama3hp.kernels.dispatch import use_triton
from llama3hp.parallel.comm import all_gather_dim, group_rank, group_size, reduce_scatter_dim


def cp_token_index(T: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global row positions [T/cp] held by CP `rank`: chunk `rank`, then chunk 2cp-1-rank."""
    if T % (2 * cp):
        raise ValueError(f"row length {T} is not divisible by 2*cp = {2 * cp}: pick seq_len divisible by it")
    c = T // (2 * cp)
    ar = torch.arange(c, device=device)
    return torch.cat([rank * c + ar, (2 * cp - 1 - rank) * c + ar])


def shard_for_cp(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """The rank's load-balanced tokens of x [B, T, ...] -> [B, T/cp, ...]."""
    if cp == 1:
        return x
    return x[:, cp_token_index(x.shape[1], cp, rank, x.device)]


class AllGatherKV(torch.autograd.Function):
    """Forward all-gather K or V over CP along the sequence (rank order); backward reduce-scatter
    the partial dK/dV each rank's queries produced back to the tokens' owners."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim(g, 1, ctx.group), None


@dataclass
class CPComm:
    """The CP group; `attention` is what ParallelAttention calls instead of kernels.attention."""

    group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        """q: [B, T_l, H, Dh]; k, v: [B, T_l, Hk, Dh] local; cu_seqlens: int32 over the GLOBAL B*T tokens.
        Returns [B, T_l, H, Dh]."""
        k_all = AllGatherKV.apply(k.contiguous(), self.group)  # [B, T, Hk, Dh], rank-major order
        v_all = AllGatherKV.apply(v.contiguous(), self.group)
        if use_triton(backend, q, k, v):
            return _cp_attention_varlen(q, k_all, v_all, cu_seqlens, self.size, self.rank, backend)
        return cp_attention_masked(q, k_all, v_all, cu_seqlens, self.size, self.rank)


def cp_attention_masked(q, k_all, v_all, cu_seqlens, cp: int, rank: int) -> torch.Tensor:
    """Plain-PyTorch CP attention: SDPA over (local queries x gathered keys) with an explicit boolean
    document-and-causal mask by global position. q: [B, T_l, H, Dh]; k_all, v_all: [B, T, Hk, Dh]."""
    B, Tl = q.shape[:2]
    T = k_all.shape[1]
    q_idx = cp_token_index(T, cp, rank, q.device)
    k_idx = torch.cat([cp_token_index(T, cp, r, q.device) for r in range(cp)])
    mask = k_idx[None, None, :] <= q_idx[None, :, None]  # [1, T_l, T]
    if cu_seqlens is not None:
        doc = K.document_ids(cu_seqlens, B * T).view(B, T)
        mask = mask & (doc[:, q_idx][:, :, None] == doc[:, k_idx][:, None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask[:, None],
        enable_gqa=q.shape[2] != k_all.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


def _cp_attention_varlen(q, k_all, v_all, cu_seqlens, cp: int, rank: int, backend: str) -> torch.Tensor:
    """The same attention through the varlen kernel with query position offsets (CUDA path): gathered
    keys are put back in global order and each local chunk is a query segment of its document(s)."""
    B, Tl, H, Dh = q.shape
    T = k_all.shape[1]
    k_idx = torch.cat([cp_token_index(T, cp, r, q.device) for r in range(cp)])
    order = torch.argsort(k_idx)
    k_g = k_all[:, order].reshape(B * T, -1, Dh)
    v_g = v_all[:, order].reshape(B * T, -1, Dh)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    c = T // (2 * cp)
    ranges = [(b * T + j * c, b * T + (j + 1) * c) for b in range(B) for j in (rank, 2 * cp - 1 - rank)]
    seg = build_cp_query_segments(cu_seqlens, ranges)
    max_k = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = attention_varlen(
        q.reshape(B * Tl, H, Dh), k_g, v_g, seg.cu_seqlens_q, cu_seqlens, seg.max_seqlen_q, max_k,
        q_doc_idx=seg.q_doc_idx, q_pos_offsets=seg.q_pos_offsets, backend=backend,
    )  # fmt: skip
    return out.view(B, Tl, H, Dh)
