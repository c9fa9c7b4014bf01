"""SwiGLU at the Llama 3 8B/70B FFN widths (14,336 / 28,672): GB/s vs copy bandwidth.

python -m benchmarks.bench_swiglu [--quick] [--out DIR]

Shapes with packed=True time what the model runs: one [tokens, 2F] tensor of [gate | up] rows (the
grouped w1/w3 GEMM's output) in, one [tokens, 2F] gradient out. llama3hp reads and writes the halves
in place (`swiglu_packed`); the peers take the halves as `x.chunk(2, -1)` views, as their users
would (Liger copies them to contiguous tensors; autograd concatenates their two gradients).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, compiled, import_or_unavailable, run_main


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, f = shape["tokens"], shape["ffn"]
    if shape.get("packed"):
        return {"x": torch.randn(n, 2 * f, device=device, dtype=dtype, requires_grad=True)}
    return {
        "gate": torch.randn(n, f, device=device, dtype=dtype, requires_grad=True),
        "up": torch.randn(n, f, device=device, dtype=dtype, requires_grad=True),
    }


def _halves(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(inp["x"].chunk(2, dim=-1)) if "x" in inp else (inp["gate"], inp["up"])


def _ours(inp, shape):
    from llama3hp.kernels.swiglu import swiglu, swiglu_packed

    if "x" in inp:
        return lambda: swiglu_packed(inp["x"], backend="triton")
    return lambda: swiglu(inp["gate"], inp["up"], backend="triton")


def _eager(inp, shape, compile_ref=False):
    from llama3hp.kernels.swiglu import swiglu_ref

    fn = compiled(swiglu_ref, next(iter(inp.values())).device) if compile_ref else swiglu_ref
    return lambda: fn(*_halves(inp))


def _liger(inp, shape):
    fn = import_or_unavailable("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    return lambda: fn.apply(*_halves(inp))


def bytes_moved(shape: dict, mode: str, dtype: torch.dtype) -> float:
    elems = shape["tokens"] * shape["ffn"] * (torch.finfo(dtype).bits // 8)
    fwd, bwd = 3 * elems, 5 * elems  # gate, up -> out; gate, up, dout -> dgate, dup
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


BENCH = Benchmark(
    name="swiglu",
    shapes=[{"tokens": 16384, "ffn": f} for f in (14336, 28672)]
    + [{"tokens": 16384, "ffn": 14336, "packed": True}],
    quick_shapes=[{"tokens": 40, "ffn": 300}, {"tokens": 40, "ffn": 300, "packed": True}],
    make_inputs=make_inputs,
    providers={
        "llama3hp": _ours,
        "torch": _eager,
        "torch.compile": lambda inp, shape: _eager(inp, shape, compile_ref=True),
        "liger": _liger,
    },
    work=bytes_moved,
    metric="GB/s",
)


def main(argv: list[str] | None = None):
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
