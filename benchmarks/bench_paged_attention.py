"""Paged-attention decode at Llama 3 8B/70B head shapes (32 or 64 query heads, 8 KV heads, dim 128):
GB/s of the K/V pages read vs copy bandwidth.

python -m benchmarks.bench_paged_attention [--quick] [--out DIR]

One query token per sequence against its whole cached context, the pages of every sequence
scattered over the cache. Providers: llama3hp (the Triton kernel: a program per KV group reads each
page once for all its query heads, long contexts split over more programs) and torch (the
reference: the pages gathered into contiguous K/V, then one masked SDPA). Forward only: decoding
has no backward. Target (H100, not asserted): >= 80% of copy bandwidth at batch >= 8.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, run_main

PAGE = 16


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    S, ctx, hq, hk, d = (
        shape["seqs"],
        shape["context"],
        shape["q_heads"],
        shape["kv_heads"],
        shape["head_dim"],
    )
    width = -(-ctx // PAGE)
    n_pages = 1 + S * width
    g = torch.Generator().manual_seed(0)
    pages = (torch.randperm(n_pages - 1, generator=g) + 1).view(S, width).to(torch.int32)
    return {
        "q": torch.randn(S, hq, d, device=device, dtype=dtype),
        "k_cache": torch.randn(n_pages, PAGE, hk, d, device=device, dtype=dtype),
        "v_cache": torch.randn(n_pages, PAGE, hk, d, device=device, dtype=dtype),
        "block_tables": pages.to(device),
        "context_lens": torch.full((S,), ctx, dtype=torch.int32, device=device),
    }


def _provider(backend: str):
    def build(inp, shape):
        from llama3hp.kernels.paged_attention import paged_attention_decode

        return lambda: paged_attention_decode(**inp, max_context_len=shape["context"], backend=backend)

    return build


def bytes_moved(shape: dict, mode: str, dtype: torch.dtype) -> float:
    """K and V of every cached token, plus q and the output."""
    e = torch.finfo(dtype).bits // 8
    kv = 2 * shape["seqs"] * shape["context"] * shape["kv_heads"] * shape["head_dim"] * e
    return kv + 2 * shape["seqs"] * shape["q_heads"] * shape["head_dim"] * e


BENCH = Benchmark(
    name="paged_attention",
    shapes=[
        {"seqs": s, "context": c, "q_heads": hq, "kv_heads": 8, "head_dim": 128}
        for hq in (32, 64)
        for s, c in ((1, 8192), (8, 4096), (64, 2048), (256, 1024))
    ],
    quick_shapes=[{"seqs": 3, "context": 37, "q_heads": 8, "kv_heads": 2, "head_dim": 32}],
    make_inputs=make_inputs,
    providers={"llama3hp": _provider("triton"), "torch": _provider("torch")},
    work=bytes_moved,
    metric="GB/s",
    modes=("fwd",),
    peers=(),
)


def main(argv: list[str] | None = None):
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
