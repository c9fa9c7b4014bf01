"""Fused linear cross-entropy at the Llama 3 8B head (hidden 4,096, vocabulary 128,256): TFLOP/s and peak memory.

python -m benchmarks.bench_cross_entropy [--quick] [--out DIR]
Work is counted as the three GEMMs (logits, grad_hidden, grad_weight: 6 N D V FLOPs for
fwd+bwd); our forward already computes the gradients, so compare providers on fwd+bwd.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, compiled, import_or_unavailable, run_main


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, d, v = shape["tokens"], shape["hidden"], shape["vocab"]
    targets = torch.randint(0, v, (n,), device=device)
    targets[::50] = -100  # a few ignored positions, as padding/masking produces
    return {
        "hidden": torch.randn(n, d, device=device, dtype=dtype, requires_grad=True),
        "weight": (torch.randn(v, d, device=device, dtype=dtype) / d**0.5).requires_grad_(),
        "targets": targets,
    }


def _ours(inp, shape):
    from llama3hp.kernels.cross_entropy import linear_cross_entropy

    return lambda: linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], backend="triton")


def _eager(inp, shape, compile_ref=False):
    from llama3hp.kernels.cross_entropy import linear_cross_entropy_ref

    fn = compiled(linear_cross_entropy_ref, inp["hidden"].device) if compile_ref else linear_cross_entropy_ref
    return lambda: fn(inp["hidden"], inp["weight"], inp["targets"])


def _liger(inp, shape):
    loss_cls = import_or_unavailable(
        "liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss"
    )
    loss_fn = loss_cls()
    return lambda: loss_fn(inp["weight"], inp["hidden"], inp["targets"])


def flops(shape: dict, mode: str, dtype: torch.dtype) -> float:
    gemm = 2.0 * shape["tokens"] * shape["hidden"] * shape["vocab"]
    return {"fwd": gemm, "bwd": 2 * gemm, "fwd+bwd": 3 * gemm}[mode]


BENCH = Benchmark(
    name="cross_entropy",
    shapes=[
        {"tokens": 16384, "hidden": 4096, "vocab": 128256},
        {"tokens": 8192, "hidden": 4096, "vocab": 128256},
    ],
    quick_shapes=[{"tokens": 64, "hidden": 32, "vocab": 500}],
    make_inputs=make_inputs,
    providers={
        "llama3hp": _ours,
        "torch": _eager,
        "torch.compile": lambda inp, shape: _eager(inp, shape, compile_ref=True),
        "liger": _liger,
    },
    work=flops,
    metric="TFLOP/s",
    memory=True,
    notes=["Target: llama3hp peak memory <= 25% of eager, speed >= 1.0x Liger (fwd+bwd)."],
)


def main(argv: list[str] | None = None):
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
