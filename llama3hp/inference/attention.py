"""The KV cache enters the model by swapping each block's attention, never by a second forward.

`apply_kv_cache(model, cache)` replaces every block's attention (the one-process `Attention`, or
tensor parallelism's `ParallelAttention`) by a `CachedAttention` holding the same projections, so
generation runs `Transformer.forward` itself: embedding, blocks, norm and head unchanged, the
attention reading and writing the paged cache. Under tensor parallelism it keeps the parallel
module's `TPComm` (the f/g operators of `llama3hp.parallel.tp_comm`), so its heads and its slice of
the cache are this rank's; on one process a `TPComm()` with no group is the identity.

One step runs all scheduled tokens as one packed row [1, N] (`AttentionMetadata` in kv_cache.py):
- every token's K/V are written to its cache slot first;
- the decode tokens (one per running sequence) attend over their cached context with the paged
  decode kernel (`llama3hp.kernels.paged_attention_decode`);
- the prefill chunks attend with the document-masked varlen attention
  (`llama3hp.kernels.attention_varlen`): several prompts packed, each a segment; a chunk of a long
  prompt (or of a prompt whose earlier chunks are cached) reads its whole context gathered from
  the cache, its queries at positions offset by what is cached.

Shape legend: N tokens of the step, H/Hk this rank's query/KV heads, Dh head dim, D model dim.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import llama3hp.kernels as K
from llama3hp.inference.kv_cache import AttentionMetadata, KVCache
from llama3hp.model.args import KernelConfig
from llama3hp.model.grouped import pack_rows_
from llama3hp.model.llama import Attention, FeedForward, Transformer
from llama3hp.parallel.tp_comm import TPComm


class CachedAttention(nn.Module):
    """The model's attention (same wq/wk/wv/wo, same parameter names) over the paged KV cache."""

    def __init__(self, attn: nn.Module, cache: KVCache, layer: int, tp: TPComm | None = None):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = attn.wq, attn.wk, attn.wv, attn.wo
        self.head_dim = attn.head_dim
        self.kernels = cast(KernelConfig, attn.kernels)
        self.cache: KVCache = cache
        self.layer: int = layer
        self.tp = tp if tp is not None else TPComm()

    def forward(self, x_BTD, positions_BT, inv_freq, cu_seqlens=None, max_seqlen=None, doc_prefix=None):
        """x: [1, N, D] the step's packed tokens; positions_BT [1, N] their positions in their
        sequences. cu_seqlens / max_seqlen / doc_prefix (the training forward's document mask and
        shared prefixes) are unused: the step's `AttentionMetadata` says what each token attends to
        (a prompt shared by n samples is shared through the cache's copy-on-write blocks)."""
        assert doc_prefix is None, "serving shares prompts through the KV cache, not a document prefix"
        meta = self.cache.meta
        assert meta is not None, "bind the step's AttentionMetadata to the cache before the forward"
        q, k, v = self.tp.column(x_BTD, [self.wq, self.wk, self.wv], grouped=True)
        B, T = q.shape[:2]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        q, k = K.apply_rope(q, k, positions_BT, inv_freq, backend=self.kernels.rope)
        q, k, v = (t.reshape(B * T, -1, self.head_dim) for t in (q, k, v))
        self.cache.write(self.layer, k, v, meta.slot_mapping)
        o = self._attend(q, k, v, meta)
        return self.tp.row(o.view(B, T, -1), self.wo)

    def _attend(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        nd = meta.n_decode
        parts = []
        if nd:
            kc, vc = self.cache.layer(self.layer)
            assert meta.block_tables is not None and meta.context_lens is not None
            od = K.paged_attention_decode(
                q[:nd].to(kc.dtype), kc, vc, meta.block_tables, meta.context_lens,
                max_context_len=meta.max_context_len, backend=self.kernels.attention,
            )  # fmt: skip
            parts.append(od.to(q.dtype))
        if q.shape[0] > nd:
            assert meta.cu_seqlens_q is not None and meta.cu_seqlens_k is not None
            if meta.gather_slots is None:
                kk, vv = k[nd:], v[nd:]
            else:
                kk, vv = self.cache.gather(self.layer, meta.gather_slots)
                kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            o = K.attention_varlen(
                q[nd:], kk, vv, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
                q_pos_offsets=meta.q_pos_offsets, backend=self.kernels.attention,
            )  # fmt: skip
            parts.append(cast(torch.Tensor, o))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def apply_kv_cache(model: Transformer, cache: KVCache) -> None:
    """Swap every block's attention for a `CachedAttention` over `cache` (in place; parameter names
    unchanged), keeping tensor parallelism's `TPComm` where `apply_tp` ran first. Also packs the
    q/k/v and w1/w3 weights into consecutive rows of one buffer each, so the grouped GEMMs read
    them as one matrix without the copy training's `CatCast` makes (the model serves, it no longer
    trains)."""
    for block in model.blocks():
        attn = block.attention
        if isinstance(attn, CachedAttention):
            raise ValueError("the model already has a KV cache: apply_kv_cache once per model")
        tp = cast(TPComm, attn.tp) if hasattr(attn, "tp") else None
        if not isinstance(attn, Attention) and tp is None:
            raise ValueError(f"cannot add a KV cache to attention of type {type(attn).__name__}")
        cp = getattr(attn, "cp", None)
        if cp is not None and cp.size > 1:
            raise ValueError("serving does not run context parallelism: build the model with cp=1")
        if tp is not None and tp.sequence_parallel and tp.size > 1:
            raise ValueError(
                "serve with TPComm(sequence_parallel=False): a decode step has one token per sequence"
            )
        _pack(attn, ["wq", "wk", "wv"])
        ffn = block.feed_forward
        if isinstance(ffn, FeedForward) or hasattr(ffn, "tp"):
            _pack(ffn, ["w1", "w3"])
        block.attention = CachedAttention(attn, cache, block.layer_id, tp)


def _pack(module: nn.Module, names: list[str]) -> None:
    linears = [module.get_submodule(n) for n in names]
    if all(type(lin) is nn.Linear for lin in linears):
        pack_rows_(linears)
