"""`llama3hp info`: parameters, FLOPs per token and memory of a model configuration."""

from __future__ import annotations

from llama3hp.model.args import ModelArgs
from llama3hp.model.flops import block_matmul_params, flops_fraction_attention, flops_per_token, matmul_params

GIB = 1024**3


def count_params(args: ModelArgs) -> dict[str, int]:
    """Parameter counts by part, computed from the config (no tensors)."""
    d = args.dim
    per_layer = block_matmul_params(args) + 2 * d  # + the two norms
    embedding = args.vocab_size * d
    head = 0 if args.tie_embeddings else args.vocab_size * d
    total = args.n_layers * per_layer + embedding + head + d
    return {
        "total": total,
        "embedding": embedding,
        "output_head": head,
        "per_layer": per_layer,
        "non_embedding": total - embedding,
    }


def model_info(args: ModelArgs, seq_len: int = 8192) -> dict:
    """Everything `llama3hp info` prints, as a JSON-serialisable dict.

    Memory is for the whole model on one device (divide by the sharding degrees for a layout):
    weights and grads in bf16 or fp32; AdamW keeps two fp32 moments, and mixed precision adds an
    fp32 master copy of the weights when the weights themselves are bf16.
    """
    n = count_params(args)
    N = n["total"]
    fpt = flops_per_token(args, seq_len)
    return {
        "config": {
            "dim": args.dim,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "n_kv_heads": args.n_kv_heads,
            "head_dim": args.head_dim,
            "ffn_dim": args.ffn_dim,
            "vocab_size": args.vocab_size,
            "rope_theta": args.rope_theta,
            "rope_scaling": args.rope_scaling,
            "tie_embeddings": args.tie_embeddings,
        },
        "params": n,
        "matmul_params": matmul_params(args),
        "seq_len": seq_len,
        "train_flops_per_token": fpt,
        "attention_flops_share": flops_fraction_attention(args, seq_len),
        "memory_gib": {
            "weights_bf16": 2 * N / GIB,
            "weights_fp32": 4 * N / GIB,
            "grads_bf16": 2 * N / GIB,
            "grads_fp32": 4 * N / GIB,
            "adamw_states_fp32": 8 * N / GIB,
            "mixed_precision_total": (2 + 4 + 4 + 8) * N / GIB,  # bf16 weights, fp32 master + grads + moments
            "fp32_total": (4 + 4 + 8) * N / GIB,
        },
    }


def format_info(name: str, info: dict) -> str:
    p, m = info["params"], info["memory_gib"]
    lines = [
        f"{name}: {p['total'] / 1e9:.3f}B parameters ({p['non_embedding'] / 1e9:.3f}B without the embedding)",
        "  " + ", ".join(f"{k}={v}" for k, v in info["config"].items()),
        f"  training FLOPs/token at seq {info['seq_len']}: {info['train_flops_per_token']:.4g} "
        f"(attention {100 * info['attention_flops_share']:.1f}%)",
        "  memory (GiB): " + ", ".join(f"{k} {v:,.1f}" for k, v in m.items()),
    ]
    return "\n".join(lines)
