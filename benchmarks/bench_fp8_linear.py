"""FP8 linear forward+backward at the Llama 3 8B/70B GEMM shapes (16,384 tokens): TFLOP/s vs bf16.

python -m benchmarks.bench_fp8_linear [--quick] [--out DIR]

Providers (all compute y = x W^T, dx and dW on the same bf16 x [tokens, in], W [out, in]):
- llama3hp: Fp8Linear, row-wise recipe: Triton cast+transpose quantization, torch._scaled_mm;
- llama3hp-triton-gemm: the same quantization, the Triton FP8 GEMM (row-wise scales in the epilogue);
- llama3hp-cuda-quant: the CUDA cast+transpose (llama3hp._fp8_cuda) with torch._scaled_mm;
- torch: bf16 torch.mm (the baseline the >= 1.6x fwd+bwd target is stated against);
- te: Transformer Engine Linear under fp8_autocast with delayed scaling, when installed.
FLOPs counted: 2*tokens*in*out forward, twice that backward; quantization time is included.
With --quick on CPU the llama3hp provider runs the Triton kernels in the interpreter.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, Unavailable, import_or_unavailable, run_main


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, k, m = shape["tokens"], shape["in"], shape["out"]
    return {
        "x": torch.randn(n, k, device=device, dtype=dtype, requires_grad=True),
        "w": (torch.randn(m, k, device=device, dtype=dtype) * k**-0.5).requires_grad_(True),
    }


def _fp8(inp, shape, **cfg_kw):
    from llama3hp.fp8 import Fp8Config, Fp8LinearFunction

    x, w = inp["x"], inp["w"]
    if not x.is_cuda:  # --quick: exercise the Triton kernels under the interpreter
        cfg_kw = {"quant_backend": "triton", "gemm": "triton"}
    cfg = Fp8Config(recipe="rowwise", **cfg_kw).validate()
    return lambda: Fp8LinearFunction.apply(x, w, None, cfg, x.dtype)


def _cuda_quant(inp, shape):
    from llama3hp.fp8.cuda_ops import cuda_ext_available

    if not cuda_ext_available():
        raise Unavailable("llama3hp._fp8_cuda not built")
    return _fp8(inp, shape, quant_backend="cuda", gemm="scaled_mm")


def _torch_mm(inp, shape):
    x, w = inp["x"], inp["w"]
    return lambda: torch.mm(x, w.t())


def _te(inp, shape):
    te = import_or_unavailable("transformer_engine.pytorch", "Linear")
    from llama3hp.fp8 import Fp8Config, te_autocast

    x, w = inp["x"], inp["w"]
    lin = te(w.shape[1], w.shape[0], bias=False, params_dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = Fp8Config(recipe="te_delayed", amax_history_len=16)

    def run():
        with te_autocast(cfg):
            return lin(x)

    return run


def flops(shape: dict, mode: str, dtype: torch.dtype) -> float:
    fwd = 2.0 * shape["tokens"] * shape["in"] * shape["out"]
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


BENCH = Benchmark(
    name="fp8_linear",
    shapes=[
        {"tokens": 16384, "in": 4096, "out": 14336},  # 8B w1/w3
        {"tokens": 16384, "in": 14336, "out": 4096},  # 8B w2
        {"tokens": 16384, "in": 8192, "out": 28672},  # 70B w1/w3
    ],
    quick_shapes=[{"tokens": 32, "in": 64, "out": 48}],
    make_inputs=make_inputs,
    providers={
        "llama3hp": _fp8,
        "torch": _torch_mm,
        "llama3hp-triton-gemm": lambda inp, shape: _fp8(inp, shape, gemm="triton"),
        "llama3hp-cuda-quant": _cuda_quant,
        "te": _te,
    },
    work=flops,
    metric="TFLOP/s",
    peers=("llama3hp-triton-gemm", "llama3hp-cuda-quant", "te"),
    memory=True,
    notes=["target on H100: llama3hp fwd+bwd >= 1.6x torch (bf16)"],
)


def main(argv: list[str] | None = None):
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
