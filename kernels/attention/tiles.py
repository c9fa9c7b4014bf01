"""H100 tile tables of the attention kernels: candidates per kernel and head-dim class, the pruner
that keeps the launch's class, and the autotune length key."""

from __future__ import annotations

import os

try:
    import triton
except ImportError:  # pragma: no cover - the reference path works without triton
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _seq_bucket(max_seqlen: int) -> int:
    """Autotune key: the next power of two of the longest document (configs differ by length)."""
    return 1 << max(int(max_seqlen) - 1, 1).bit_length()


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for H100 per kernel and head-dim class
# ("64": D <= 64, "128": D <= 128, "256": larger), and for dK/dV whether dQ is accumulated
# atomically in the same kernel. Chosen from the sm_90 compile report
# (`python -m benchmarks.aot_compile`, benchmarks/results/aot-sm90/): each compiles with at most
# 64 bytes of register spill and fits the 227 KiB of shared memory, with GQA (GROUP > 1). At
# D = 128 the first lists had 4-warp tiles spilling 300-2,500 bytes per thread in the dK/dV
# loop. The autotuner times the candidates of the launch's class on the GPU, picks per (head
# dim, length bucket[, atomic dQ]) and caches the choice on disk (cache_results).
_CANDIDATES = {
    "fwd": {
        "64": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3)],
        "128": [
            (128, 64, 8, 3),
            (128, 64, 8, 2),
            (64, 64, 8, 3),
            (64, 128, 8, 2),
            (128, 32, 8, 3),
            (64, 64, 4, 2),
        ],
        "256": [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
    },
    "dkdv_atomic": {
        "64": [
            (16, 64, 8, 3),
            (32, 64, 8, 3),
            (16, 128, 8, 2),
            (32, 128, 8, 3),
            (64, 32, 8, 2),
            (16, 64, 4, 3),
        ],
        "128": [(16, 64, 8, 3), (64, 32, 8, 3), (64, 32, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2)],
        "256": [(16, 32, 8, 2), (16, 64, 8, 1)],
    },
    "dkdv": {
        "64": [
            (32, 64, 8, 3),
            (64, 64, 8, 3),
            (32, 128, 8, 3),
            (64, 128, 8, 3),
            (64, 32, 8, 3),
            (16, 64, 8, 3),
        ],
        "128": [(16, 64, 8, 3), (16, 128, 8, 2), (16, 128, 8, 3), (64, 32, 8, 2), (64, 32, 8, 3)],
        "256": [(16, 32, 8, 2), (16, 64, 8, 1)],
    },
    "dq": {
        "64": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3), (128, 32, 8, 3)],
        "128": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 128, 8, 2)],
        "256": [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
}


def _head_dim_class(head_dim: int) -> str:
    return "64" if head_dim <= 64 else "128" if head_dim <= 128 else "256"


def _all_configs(kernels: tuple[str, ...]) -> list[triton.Config]:
    """Every candidate of `kernels` (the autotuner's list; _prune keeps the launch's class). The
    interpreter runs one config with small tiles: ~0.5 ms per program, and a 64x64 tl.dot is slow there."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    seen = dict.fromkeys(c for k in kernels for lst in _CANDIDATES[k].values() for c in lst)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in seen]


def _pruner(kernel: str):
    """early_config_prune keeping the candidates of the launch's head-dim class (and dQ mode)."""

    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        name = "dkdv_atomic" if kernel == "dkdv" and args.get("ATOMIC_DQ") else kernel
        keep = set(_CANDIDATES[name][_head_dim_class(int(args["HEAD_DIM"]))])
        chosen = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep
        ]
        return chosen or configs

    return {"early_config_prune": prune}


if triton is not None:
    _FWD_CONFIGS = _all_configs(("fwd",))
    _DKDV_CONFIGS = _all_configs(("dkdv", "dkdv_atomic"))
    _DQ_CONFIGS = _all_configs(("dq",))
    _CACHE = not _INTERPRET
