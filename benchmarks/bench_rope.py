"""RoPE on q and k together, Llama 3 8B (32/8 heads) and 70B (64/8 heads), head dim 128: GB/s.

python -m benchmarks.bench_rope [--quick] [--out DIR]
Liger's kernel takes precomputed cos/sin tables (built outside the timed region); ours computes
the angles from positions and inv_freq in the kernel.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Benchmark, compiled, import_or_unavailable, run_main


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    b, t, hq, hk, d = shape["batch"], shape["seq"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    return {
        "q": torch.randn(b, t, hq, d, device=device, dtype=dtype, requires_grad=True),
        "k": torch.randn(b, t, hk, d, device=device, dtype=dtype, requires_grad=True),
        "positions": torch.arange(t, device=device).repeat(b, 1),
        "inv_freq": inv_freq,
    }


def _ours(inplace: bool):
    def build(inp, shape):
        from llama3hp.kernels.rope import apply_rope

        q, k, pos, inv = inp["q"], inp["k"], inp["positions"], inp["inv_freq"]
        if inplace:  # rotate non-leaf copies, as the model does with its projections
            return lambda: apply_rope(q * 1, k * 1, pos, inv, inplace=True, backend="triton")
        return lambda: apply_rope(q, k, pos, inv, backend="triton")

    return build


def _eager(inp, shape, compile_ref=False):
    from llama3hp.kernels.rope import apply_rope_ref

    fn = compiled(apply_rope_ref, inp["q"].device) if compile_ref else apply_rope_ref
    return lambda: fn(inp["q"], inp["k"], inp["positions"], inp["inv_freq"])


def _liger(inp, shape):
    fn = import_or_unavailable("liger_kernel.ops.rope", "LigerRopeFunction")
    angles = inp["positions"][..., None].float() * inp["inv_freq"]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]: Liger's half-split tables
    cos, sin = angles.cos().to(inp["q"].dtype), angles.sin().to(inp["q"].dtype)

    # Liger takes [B, H, T, D]; these transposed views are our [B, T, H, D] memory, and its outputs
    # are transposed back (views, no copies) so they line up with ours for the agreement check.
    # It rotates q and k in place: repeated timed calls keep rotating the same buffers.
    def run():
        q, k = fn.apply(inp["q"].transpose(1, 2), inp["k"].transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    return run


def bytes_moved(shape: dict, mode: str, dtype: torch.dtype) -> float:
    tokens = shape["batch"] * shape["seq"]
    qk = tokens * (shape["q_heads"] + shape["kv_heads"]) * shape["head_dim"] * (torch.finfo(dtype).bits // 8)
    one = 2 * qk + tokens * 8  # q, k in and out; int64 positions
    # Our in-place provider also pays the q * 1 copies (another read and write of q and k).
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]


BENCH = Benchmark(
    name="rope",
    shapes=[{"batch": 2, "seq": 8192, "q_heads": hq, "kv_heads": 8, "head_dim": 128} for hq in (32, 64)],
    quick_shapes=[{"batch": 1, "seq": 24, "q_heads": 4, "kv_heads": 2, "head_dim": 32}],
    make_inputs=make_inputs,
    providers={
        "llama3hp": _ours(inplace=False),
        "llama3hp(inplace)": _ours(inplace=True),
        "torch": _eager,
        "torch.compile": lambda inp, shape: _eager(inp, shape, compile_ref=True),
        "liger": _liger,
    },
    work=bytes_moved,
    metric="GB/s",
    notes=["llama3hp(inplace) times include the q*1, k*1 copies that give it non-leaf tensors to rotate."],
)


def main(argv: list[str] | None = None):
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
