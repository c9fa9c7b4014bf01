"""RMSNorm (and the fused residual-add variant) at Llama 3 8B/70B widths: GB/s vs copy bandwidth.

Shapes with "autocast" are the model's block under the trainer's autocast: an fp32 residual stream
plus a bf16 branch output, normalised into the bf16 input of the next linears (h stays fp32).

python -m benchmarks.bench_rmsnorm [--quick] [--out DIR]
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, Unavailable, compiled, import_or_unavailable, run_main

EPS = 1e-5


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, d = shape["tokens"], shape["dim"]
    wide = torch.float32 if shape.get("autocast") else dtype  # master weight, residual stream
    inputs = {
        "x": torch.randn(n, d, device=device, dtype=dtype, requires_grad=True),
        "weight": (torch.rand(d, device=device, dtype=wide) + 0.5).requires_grad_(),
    }
    if shape["residual"]:
        inputs["residual"] = torch.randn(n, d, device=device, dtype=wide, requires_grad=True)
    return inputs


def _provider(kernel_backend: str | None = None, compile_ref: bool = False):
    def build(inp: dict[str, torch.Tensor], shape: dict):
        from llama3hp.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_residual, rms_norm_residual_ref

        x, w = inp["x"], inp["weight"]
        if shape["residual"]:
            r = inp["residual"]
            out = x.dtype if shape.get("autocast") else None
            if kernel_backend:
                return lambda: rms_norm_residual(x, r, w, EPS, out_dtype=out, backend=kernel_backend)
            fn = compiled(rms_norm_residual_ref, x.device) if compile_ref else rms_norm_residual_ref
            return lambda: fn(x, r, w, EPS, out)
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
    if shape.get("autocast"):  # bf16 branch + fp32 residual in, fp32 h + bf16 y out; grads alike
        fwd = n * d * (es + 4 + 4 + es) + d * 4
        bwd = n * d * (4 + es + 4 + es + 4) + d * 4  # h, dy, dh in; d(branch), d(residual) out
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    rows = n * d * es
    fwd = rows * (4 if shape["residual"] else 2) + d * es  # x (+ residual) in, y (+ h) out
    bwd = rows * (4 if shape["residual"] else 3) + d * es  # x, dy (+ dh) in, dx out
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


BENCH = Benchmark(
    name="rmsnorm",
    shapes=[{"tokens": 16384, "dim": d, "residual": r} for r in (False, True) for d in (4096, 8192)]
    + [{"tokens": 16384, "dim": d, "residual": True, "autocast": True} for d in (4096, 8192)],
    quick_shapes=[{"tokens": 48, "dim": 200, "residual": r} for r in (False, True)]
    + [{"tokens": 48, "dim": 200, "residual": True, "autocast": True}],
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
