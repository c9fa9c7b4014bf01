"""Tensor parallelism with sequence parallelism (Megatron-LM style), applied to a built model.

`apply_tp` shards a Transformer's weights in place and swaps in the parallel modules; the model's
forward is untouched. Column-parallel linears (wq, wk, wv, w1, w3) split output features over the
TP ranks, row-parallel linears (wo, w2) split input features; the embedding and the head split the
vocabulary (`vocab_parallel.py`). The communication each module runs is `TPComm`'s (`tp_comm.py`:
the f/g operators, sequence-parallel gathers and reduce-scatters, or the overlapped GEMMs of
`tp_overlap.py`). Context parallelism enters through the same modules: `ParallelAttention` calls
`CPComm.attention` (`context.py`) and `ParallelHead` reduces per-document sums over the CP group.

FP8: the parallel blocks call the model's linear modules, so an `llama3hp.fp8.Fp8Linear` (converted
before `apply_tp`, which then shards its weight) runs its FP8 GEMMs on the shard.

Shape legend: B rows, T tokens per row (after CP), S = T/tp tokens of a sequence shard, D model dim.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import llama3hp.kernels as K
from llama3hp.model.grouped import groupable
from llama3hp.model.llama import Attention, FeedForward, Transformer
from llama3hp.parallel.tp_comm import TPComm
from llama3hp.parallel.vocab_parallel import ParallelHead, VocabParallelEmbedding

# Modules that replace the model's keep its parameter names, so state dicts keep their FQNs.


class ParallelAttention(nn.Module):
    """The model's attention with TP-sharded heads and optional context parallelism (cp: CPComm)."""

    def __init__(self, attn: Attention, tp: TPComm, cp=None):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = attn.wq, attn.wk, attn.wv, attn.wo
        self.head_dim, self.kernels = attn.head_dim, attn.kernels
        self.tp, self.cp = tp, cp

    def forward(self, x, positions_BT, inv_freq, cu_seqlens, max_seqlen, doc_prefix=None):
        """x: [B, S, D] (SP) or [B, T, D]; positions_BT: [B, T] global RoPE positions of local tokens."""
        q, k, v = self.tp.column(x, [self.wq, self.wk, self.wv], grouped=True)
        B, T = q.shape[:2]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        q, k = K.apply_rope(q, k, positions_BT, inv_freq, backend=self.kernels.rope)
        if self.cp is not None and self.cp.size > 1:
            o = self.cp.attention(q, k, v, cu_seqlens, backend=self.kernels.attention, doc_prefix=doc_prefix)
        else:
            o = K.attention(
                q,
                k,
                v,
                cu_seqlens,
                max_seqlen=max_seqlen,
                doc_prefix=doc_prefix,
                backend=self.kernels.attention,
            )
        return self.tp.row(o.reshape(B, T, -1), self.wo)


class ParallelFeedForward(nn.Module):
    """SwiGLU with w1/w3 column-parallel (one grouped GEMM over their local shards where they are
    groupable, as in the one-process model) and w2 row-parallel."""

    def __init__(self, ffn: FeedForward, tp: TPComm):
        super().__init__()
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3
        self.backend, self.tp = ffn.backend, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if groupable([self.w1, self.w3]):
            h = K.swiglu_packed(self.tp.column_grouped(x, [self.w1, self.w3]), backend=self.backend)
        else:
            h = K.swiglu(*self.tp.column(x, [self.w1, self.w3]), backend=self.backend)
        return self.tp.row(h, self.w2)


def _shard(p: torch.Tensor, dim: int, tp: TPComm) -> nn.Parameter:
    if p.shape[dim] % tp.size:
        raise ValueError(f"cannot split a dimension of size {p.shape[dim]} over tp={tp.size} ranks")
    return nn.Parameter(p.detach().chunk(tp.size, dim=dim)[tp.rank].clone())


# (module path inside a block, the dim its weight is split along): column-parallel 0, row-parallel 1.
BLOCK_SHARDING = (
    ("attention.wq", 0),
    ("attention.wk", 0),
    ("attention.wv", 0),
    ("attention.wo", 1),
    ("feed_forward.w1", 0),
    ("feed_forward.w3", 0),
    ("feed_forward.w2", 1),
)


def apply_tp(model: Transformer, tp: TPComm, cp=None) -> dict[str, int]:
    """Shard a Transformer's weights over TP in place and swap in the parallel modules (with
    tp.size == 1: only context parallelism's attention and head). Parameter names are unchanged.

    Returns {parameter name: the dim split over TP} for the sharded parameters; the others (the
    norms) are replicated, and under sequence parallelism their gradients are partial sums over the
    sequence shards, which the data-parallel wrapper reduces over TP.
    """
    if model.args.tie_embeddings and tp.size > 1:
        raise ValueError("tensor parallelism with tied embeddings is not supported: use an untied preset")
    split: dict[str, int] = {}
    for layer in model.blocks():
        if tp.size > 1:
            for path, dim in BLOCK_SHARDING:
                lin = layer.get_submodule(path)
                assert isinstance(lin, nn.Linear), path
                lin.weight = _shard(lin.weight, dim, tp)
                split[f"layers.{layer.layer_id}.{path}.weight"] = dim
        layer.attention = ParallelAttention(cast(Attention, layer.attention), tp, cp)
        layer.feed_forward = ParallelFeedForward(cast(FeedForward, layer.feed_forward), tp)
    if isinstance(model.tok_embeddings, nn.Embedding) and tp.size > 1:
        w = _shard(model.tok_embeddings.weight, 0, tp)
        model.tok_embeddings = VocabParallelEmbedding(w, tp.rank * w.shape[0], tp)
        split["tok_embeddings.weight"] = 0
    if model.output is not None:
        shard = _shard(model.output.projection(), 0, tp) if tp.size > 1 else None
        cp_group = cp.group if cp is not None and cp.size > 1 else None
        model.output = ParallelHead(model.output, tp, cp_group, shard)
        if tp.size > 1:
            split["output.weight"] = 0
    return split
