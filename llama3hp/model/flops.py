"""Model FLOPs per token, with attention counted for the document mask actually used.

Per token, forward + backward (backward = 2x forward):
- matmuls: 6 * N_matmul, N_matmul = the parameters of every linear layer, output head included
  (the embedding is a lookup, not a matmul);
- attention: per layer, each attended (query, key) pair costs 2*Dh*H for QK^T and 2*Dh*H for PV
  forward, so 12 * n_layers * H * Dh per pair for forward + backward.
Under the causal document mask a document of length L has L(L+1)/2 attended pairs, so a row
split into documents L_1..L_k has sum_i L_i(L_i+1)/2 pairs; we divide by the row's tokens.
This counts only useful (unmasked) work, as FlashAttention's benchmarks do; PaLM's formula
(6N + 12*L*H*Q*T) counts every pair of a full square and so reports about twice the attention
FLOPs of a causal model. Recomputation (activation checkpointing) is not model FLOPs: MFU
ignores it by definition.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama3hp.model.args import ModelArgs


def block_matmul_params(args: ModelArgs) -> int:
    """Linear-layer parameters of one transformer block (wq, wk, wv, wo, w1, w2, w3)."""
    d, hd = args.dim, args.head_dim
    return d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2 + 3 * d * args.ffn_dim


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in matmuls: every linear of the blocks plus the output head (tied or
    not; a reward model's head is one row of dim)."""
    head = args.dim * (1 if args.head == "reward" else args.vocab_size)
    return args.n_layers * block_matmul_params(args) + head


def attention_pairs_per_token(seq_len: int, doc_lens: Sequence[int] | None = None) -> float:
    """Mean attended (query, key) pairs per token under the causal document mask.

    doc_lens: the document (segment) lengths of one or more rows, summing to a multiple of
    seq_len; None: one document per row.
    """
    if doc_lens is None:
        return (seq_len + 1) / 2
    total = sum(doc_lens)
    if total <= 0:
        raise ValueError("doc_lens must contain at least one token")
    return sum(n * (n + 1) / 2 for n in doc_lens) / total


def flops_per_token(args: ModelArgs, seq_len: int, doc_lens: Sequence[int] | None = None) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    attn = 12 * args.n_layers * args.n_heads * args.head_dim * attention_pairs_per_token(seq_len, doc_lens)
    return 6 * matmul_params(args) + attn


def flops_fraction_attention(args: ModelArgs, seq_len: int, doc_lens: Sequence[int] | None = None) -> float:
    """Share of the training FLOPs spent in attention scores (useful for planning long context)."""
    total = flops_per_token(args, seq_len, doc_lens)
    return (total - 6 * matmul_params(args)) / total
