"""The Llama 3 Transformer in plain PyTorch.

No collectives live here: parallelism (TP/CP/PP/DP) is applied from outside by llama3hp.parallel.
Every fused op goes through llama3hp.kernels, which picks Triton on CUDA and the reference
elsewhere; ModelArgs.kernels selects per op.

Shape legend: B batch rows, T tokens per row, D model dim, H query heads, Hk KV heads,
Dh head dim, F FFN hidden, V vocabulary.
"""

from __future__ import annotations

import math
import zlib
from typing import cast

import torch
from torch import nn

import llama3hp.kernels as K
from llama3hp.data.batch import IGNORE_INDEX
from llama3hp.kernels.dispatch import matmul_dtype
from llama3hp.model.args import KernelConfig, ModelArgs
from llama3hp.model.grouped import groupable, grouped_linear, grouped_linears
from llama3hp.model.head import HeadOutput, OutputHead
from llama3hp.model.rope import document_positions, rope_inv_freq


class RMSNorm(nn.Module):
    """RMSNorm whose output is in the dtype its consumers compute in: autocast's under autocast (the
    linears that follow would cast to it anyway; the kernel writes it directly), else the input's."""

    def __init__(self, dim: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps, out_dtype=matmul_dtype(x), backend=self.backend)

    def add_and_norm(self, branch: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h), h) with h = residual + branch in one pass (h keeps the residual stream's dtype)."""
        return K.rms_norm_residual(
            branch, residual, self.weight, self.eps, out_dtype=matmul_dtype(residual), backend=self.backend
        )


class Attention(nn.Module):
    """Grouped-query attention with RoPE and the document mask."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.kernels: KernelConfig = args.kernels
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        positions_BT: torch.Tensor,
        inv_freq: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        doc_prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (
            t.view(B, T, -1, self.head_dim) for t in grouped_linears(x_BTD, [self.wq, self.wk, self.wv])
        )
        q, k = K.apply_rope(q, k, positions_BT, inv_freq, backend=self.kernels.rope)
        o = K.attention(
            q, k, v, cu_seqlens, max_seqlen=max_seqlen, doc_prefix=doc_prefix, backend=self.kernels.attention
        )
        return self.wo(o.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x), with w1 and w3 as one GEMM whose [gate | up] rows the SwiGLU
    kernel reads in place where they are groupable."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.backend = args.kernels.swiglu
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if groupable([self.w1, self.w3]):
            return self.w2(K.swiglu_packed(grouped_linear(x, [self.w1, self.w3]), backend=self.backend))
        return self.w2(K.swiglu(self.w1(x), self.w3(x), backend=self.backend))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.kernels.rmsnorm)
        # nn.Module: tensor and context parallelism swap in their own attention and FFN
        self.attention: nn.Module = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.kernels.rmsnorm)
        self.feed_forward: nn.Module = FeedForward(args)

    def forward(self, x, positions, inv_freq, cu_seqlens, max_seqlen, doc_prefix=None):
        a = self.attention(self.attention_norm(x), positions, inv_freq, cu_seqlens, max_seqlen, doc_prefix)
        y, h = self.ffn_norm.add_and_norm(a, x)  # h = x + a, fused with the FFN's norm
        return h + self.feed_forward(y)


def init_parameter(args: ModelArgs, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 CPU initial value [shape] of the parameter `name` of the whole model.

    Megatron-style: normal(0, init_std) for embeddings and linears, the output projections of each
    residual branch (wo, w2) at init_std / sqrt(2 * n_layers), norms at 1. Each parameter draws from
    its own generator seeded by (seed, name), so a value depends on nothing else: not on which
    parameters a rank holds, nor on the order of initialisation (a rank of a mesh draws only the
    parameters it keeps, `llama3hp.parallel.parallelize.materialize_local`).
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = args.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std /= math.sqrt(2 * args.n_layers)
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


class Transformer(nn.Module):
    """Llama 3. Layers sit in a ModuleDict keyed "0".."n-1" so a pipeline stage is this same module
    with the parts it does not own removed (layers dropped; tok_embeddings, or norm and output, set
    to None) and the names of the parameters it keeps unchanged. Its forward is the one forward of
    every layout: parallelism swaps modules (attention, FFN, embedding, head), never the forward."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args.validate()
        embedding = nn.Embedding(args.vocab_size, args.dim)
        # Swapped for a vocab-parallel one under tensor parallelism; None on later pipeline stages.
        self.tok_embeddings: nn.Module | None = embedding
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps, args.kernels.rmsnorm)
        # Tied presets (Llama 3.2) project with the embedding matrix itself: no output.weight.
        self.output: OutputHead | None = (
            OutputHead(None, args.kernels.cross_entropy, tied_to=embedding)
            if args.tie_embeddings
            else OutputHead(torch.empty(args.vocab_size, args.dim), args.kernels.cross_entropy)
        )
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def init_weights(self, seed: int = 0) -> None:
        """Every parameter set to `init_parameter(args, name, shape, seed)`."""
        self.inv_freq = rope_inv_freq(self.args, device=self.inv_freq.device)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init_parameter(self.args, name, tuple(p.shape), seed))

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        positions: torch.Tensor | None = None,
        doc_prefix: torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = IGNORE_INDEX,
        z_loss_scale: float = 0.0,
    ) -> torch.Tensor | HeadOutput:
        """tokens: [B, T] ids (or the previous stage's hidden states [B, T, D] on a pipeline stage
        without the embedding; [B, T/tp, D] under sequence parallelism, with `positions` given).

        cu_seqlens: int32 [n_docs + 1] document boundaries over the flattened B*T tokens (None: one
        document per row); max_seqlen: the longest document; positions: [B, T] RoPE positions
        (default: restart per document when args.doc_positions, else 0..T-1); doc_prefix: int
        [n_docs], each document's shared prefix (an earlier document it also attends to entirely: a
        DPO pair's prompt) or -1 (`llama3hp.kernels.attention`).
        Returns, on a stage without the head, the hidden states [B, T, D]; else with targets [B, T]
        the loss (`HeadOutput.loss`: fp32 scalar; [B*T] for reduction="none"), and without them the
        `HeadOutput` (final hidden states bound to the head: losses, log-probabilities, logits).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            B, T = tokens.shape[:2]
            positions = document_positions(
                cu_seqlens if self.args.doc_positions or doc_prefix is not None else None,
                B,
                T,
                h.device,
                doc_prefix,
            )
        for layer in self.layers.values():
            h = layer(h, positions, self.inv_freq, cu_seqlens, max_seqlen, doc_prefix)
        if self.output is None or self.norm is None:
            return h
        out = self.output(self.norm(h))
        if targets is None:
            return out
        return out.loss(targets, reduction=reduction, ignore_index=ignore_index, z_loss_scale=z_loss_scale)

    def blocks(self) -> list[TransformerBlock]:
        """The transformer blocks this model (or pipeline stage) holds, in order."""
        return [cast(TransformerBlock, b) for b in self.layers.values()]

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.tok_embeddings is not None:
            n -= sum(p.numel() for p in self.tok_embeddings.parameters())
        return n
