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

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import llama3hp.kernels as K
from llama3hp.kernels.dispatch import matmul_dtype
from llama3hp.model.args import KernelConfig, ModelArgs
from llama3hp.model.rope import rope_inv_freq


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


def groupable(linears: list[nn.Module]) -> bool:
    """Whether `grouped_linear` can run these as one GEMM: two or more bias-free linears, all plain
    nn.Linear or all Fp8Linear with one FP8 config (not TE modules, not a mix)."""
    first = linears[0]
    kind = type(first)
    if len(linears) < 2 or any(type(lin) is not kind or lin.bias is not None for lin in linears):
        return False
    if kind is nn.Linear:
        return True
    from llama3hp.fp8.linear import Fp8Linear

    return kind is Fp8Linear and all(lin.fp8_config == first.fp8_config for lin in linears)


class CatCast(torch.autograd.Function):
    """torch.cat([w.to(dtype) for w in weights]) in one pass: each weight is cast straight into its rows
    of the output, one read of the (fp32 master) weights and one write of the result instead of a cast
    and then a copy. Backward hands each weight its rows of the gradient, cast to its dtype."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        rows = [w.shape[0] for w in weights]
        out = torch.empty((sum(rows), *weights[0].shape[1:]), dtype=dtype, device=weights[0].device)
        for piece, w in zip(out.split(rows), weights):
            piece.copy_(w)
        ctx.rows, ctx.dtypes = rows, [w.dtype for w in weights]
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, *(g.to(dt) for g, dt in zip(grad.split(ctx.rows), ctx.dtypes))


def grouped_linear(x: torch.Tensor, linears: list[nn.Module]) -> torch.Tensor:
    """The linears of x as ONE GEMM over their concatenated weights: [..., sum of their outputs], each
    linear's outputs in order (under TP: the local shards'). The linears must be `groupable`.

    Attention's q, k and v projections read the same x: one GEMM with N = (H + 2 Hk) Dh instead of
    three (the k/v ones are narrow: N = 512 on the 1B), and the backward's three input-gradient GEMMs
    and their sum become one GEMM; likewise the FFN's w1 and w3, whose output `swiglu_packed` takes
    whole. Plain linears get their weights cast to the matmul dtype and concatenated in one pass
    (`CatCast`); FP8 linears quantize x once instead of once per linear (the weights' per-output-channel
    scales are the same as separately; the input gradient's per-token scales span all the outputs).
    Parameters are untouched; the TP paths group the same projections (`TPComm.column_grouped`).
    """
    if type(linears[0]) is nn.Linear:
        dt = matmul_dtype(x)
        return F.linear(x.to(dt), CatCast.apply(dt, *(lin.weight for lin in linears)))
    from llama3hp.fp8.linear import fp8_linear

    return fp8_linear(x, torch.cat([lin.weight for lin in linears]), None, linears[0].fp8_config)


def grouped_linears(x: torch.Tensor, linears: list[nn.Module]) -> list[torch.Tensor]:
    """[lin(x) for lin in linears], as one `grouped_linear` GEMM split by output where they are
    `groupable`, else one linear at a time."""
    if not groupable(linears):
        return [lin(x) for lin in linears]
    y = grouped_linear(x, linears)
    return list(y.split([lin.weight.shape[0] for lin in linears], dim=-1))


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
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (
            t.view(B, T, -1, self.head_dim) for t in grouped_linears(x_BTD, [self.wq, self.wk, self.wv])
        )
        q, k = K.apply_rope(q, k, positions_BT, inv_freq, backend=self.kernels.rope)
        o = K.attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, backend=self.kernels.attention)
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
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.kernels.rmsnorm)
        self.feed_forward = FeedForward(args)
        self.checkpointed = False  # activation checkpointing: see set_activation_checkpointing

    def forward(self, x, positions, inv_freq, cu_seqlens, max_seqlen):
        if self.checkpointed and torch.is_grad_enabled():
            # Non-reentrant: backward re-runs _forward (under the autocast state of the forward) when
            # it first needs a saved tensor; the block has no randomness, so no RNG state is stashed.
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, positions, inv_freq, cu_seqlens, max_seqlen,
                use_reentrant=False, preserve_rng_state=False,
            )  # fmt: skip
        return self._forward(x, positions, inv_freq, cu_seqlens, max_seqlen)

    def _forward(self, x, positions, inv_freq, cu_seqlens, max_seqlen):
        a = self.attention(self.attention_norm(x), positions, inv_freq, cu_seqlens, max_seqlen)
        y, h = self.ffn_norm.add_and_norm(a, x)  # h = x + a, fused with the FFN's norm
        return h + self.feed_forward(y)


def set_activation_checkpointing(models: nn.Module | list[nn.Module], every: int | None) -> int:
    """Full activation checkpointing of every `every`-th block (layer_id % every == 0; None: off) in
    `models` (a Transformer, or a pipeline rank's chunks): such a block keeps only its input for
    backward, which recomputes its forward (about a third more block FLOPs). By layer id, so every
    pipeline split of a model checkpoints the same blocks. Parameter names are unchanged. Returns
    how many blocks are checkpointed."""
    if every is not None and every < 1:
        raise ValueError(f"activation checkpointing interval must be >= 1, got {every}")
    n = 0
    for model in models if isinstance(models, list | tuple) else [models]:
        for block in model.layers.values():
            block.checkpointed = every is not None and block.layer_id % every == 0
            n += block.checkpointed
    return n


def document_positions(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """RoPE positions [B, T]: restart at 0 at each document start of cu_seqlens (flattened B*T)."""
    if cu_seqlens is None:
        return torch.arange(T, device=device).expand(B, T)
    doc = K.document_ids(cu_seqlens, B * T)
    pos = torch.arange(B * T, device=device, dtype=torch.int64) - cu_seqlens.to(torch.int64)[doc]
    return pos.view(B, T)


class Transformer(nn.Module):
    """Llama 3. Layers sit in a ModuleDict keyed "0".."n-1" so a pipeline stage can drop layers (and
    set tok_embeddings / norm / output to None) without renaming the parameters it keeps."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args.validate()
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps, args.kernels.rmsnorm)
        # Tied presets (Llama 3.2) own no separate head: the embedding matrix is used directly, which
        # survives to_empty/load_state_dict (a shared Parameter does not) and matches HF's layout.
        self.output: nn.Linear | None = (
            None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def init_weights(self, seed: int = 0) -> None:
        """Megatron-style init: normal(0, init_std) for embeddings and linears, the output projections of
        each residual branch (wo, w2) at init_std / sqrt(2 * n_layers), norms at 1.

        Each parameter draws from its own generator seeded by (seed, parameter name), so the values do
        not depend on which parameters a rank holds or on the order of initialisation.
        """
        args = self.args
        self.inv_freq = rope_inv_freq(args, device=self.inv_freq.device)
        residual_std = args.init_std / math.sqrt(2 * args.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                std = (
                    residual_std
                    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
                    else args.init_std
                )
                g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        positions: torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        z_loss_scale: float = 0.0,
    ) -> torch.Tensor:
        """tokens: [B, T] ids (or [B, T, D] hidden states on a pipeline stage without embeddings).

        cu_seqlens: int32 [n_docs + 1] document boundaries over the flattened B*T tokens (None: one
        document per row); max_seqlen: the longest document; positions: [B, T] RoPE positions
        (default: restart per document when args.doc_positions, else 0..T-1).
        Returns the loss (fp32 scalar; [B*T] for reduction="none") when targets [B, T] are given,
        the logits [B, T, V] on the last stage otherwise, or the hidden states [B, T, D] on a stage
        without the output head.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        B, T = h.shape[:2]
        if positions is None:
            positions = document_positions(cu_seqlens if self.args.doc_positions else None, B, T, h.device)
        for layer in self.layers.values():
            h = layer(h, positions, self.inv_freq, cu_seqlens, max_seqlen)
        if self.norm is not None:
            h = self.norm(h)
        head = self.head_weight()
        if head is None:
            return h
        if targets is None:
            return F.linear(h, head)
        return K.linear_cross_entropy(
            h.reshape(B * T, -1),
            head,
            targets.reshape(B * T),
            ignore_index=ignore_index,
            reduction=reduction,
            z_loss_scale=z_loss_scale,
            backend=self.args.kernels.cross_entropy,
        )

    def head_weight(self) -> torch.Tensor | None:
        """The output projection [V, D] (the embedding when tied), or None on a stage without the head."""
        if self.args.tie_embeddings:
            return (
                self.tok_embeddings.weight
                if self.tok_embeddings is not None and self.norm is not None
                else None
            )
        return self.output.weight if self.output is not None else None

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n
