"""RMSNorm (and the fused residual-add variant) at Llama 3 8B/70B widths: GB/s vs copy bandwidth.

python -m benchmarks.bench_rmsnorm [--quick] [--out DIR]
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, Unavailable, compiled, import_or_unavailable, run_main

EPS = 1e-5


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, d = shape["tokens"], shape["dim"]
    inputs = {
        "x": torch.randn(n, d, device=device, dtype=dtype, requires_grad=True),
        "weight": (torch.rand(d, device=device, dtype=dtype) + 0.5).requires_grad_(),
    }
    if shape["residual"]:
        inputs["residual"] = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    return inputs


def _provider(kernel_backend: str | None = None, compile_ref: bool = False):
    def build(inp: dict[str, torch.Tensor], shape: dict):
        from llama3hp.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_residual, rms_norm_residual_ref

        x, w = inp["x"], inp["weight"]
        if shape["residual"]:
            r = inp["residual"]
            if kernel_backend:
                return lambda: rms_norm_residual(x, r, w, EPS, backend=kernel_backend)
            fn = compiled(rms_norm_residual_ref, x.device) if compile_ref else rms_norm_residual_ref
            return lambda: fn(x, r, w, EPS)
        if kernel_backend:
            return lambda: rms_norm(x, w, EPS, backend=kernel_backend)
        fn = compiled(rms_norm_ref, x.device) if compile_ref else rms_norm_ref
        return lambda: fn(x, w, EPS)

    return build


def _liger(inp: dict[str, torch.Tensor], shape: dict):
    if shape["residual"]:
        raise Unavailable("Liger has no fused residual RMSNorm")
    fn = import_or_unavailable("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    x, w = inp["x"], inp["weight"]
    return lambda: fn.apply(x, w, EPS)


def bytes_moved(shape: dict, mode: str, dtype: torch.dtype) -> float:
    n, d, es = shape["tokens"], shape["dim"], torch.finfo(dtype).bits // 8
    rows = n * d * es
    fwd = rows * (4 if shape["residual"] else 2) + d * es  # x (+ residual) in, y (+ h) out
    bwd = rows * (4 if shape["residual"] else 3) + d * es  # x, dy (+ dh) in, dx out
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


BENCH = Benchmark(
    name="rmsnorm",
    shapes=[{"tokens": 16384, "dim": d, "residual": r} for r in (False, True) for d in (4096, 8192)],
    quick_shapes=[{"tokens": 48, "dim": 200, "residual": r} for r in (False, True)],
    make_inputs=make_inputs,
    providers={
        "llama3hp": _provider("triton"),
        "torch": _provider(),
        "torch.compile": _provider(compile_ref=True),
        "liger": _liger,
    },
    work=bytes_moved,
    metric="GB/s",
)


def main(argv: list[str] | None = None):
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
