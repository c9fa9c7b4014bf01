"""FP8 linears under tensor parallelism, GEMM by GEMM, on 2 spawned gloo ranks.

Row-wise scales follow each GEMM's reduction dim. Under TP the reduction dims that stay whole give
exactly the one-process FP8 result: a column-parallel linear's forward (x per token over all of D,
W per output channel) and weight gradient (both along the tokens, which the sequence gather makes
whole); a row-parallel linear's input and weight gradients. The other GEMMs reduce over a TP shard
and quantize per shard: those are checked to FP8 tolerance. Exact agreement with FP8, and not with
the plain linear, shows the FP8 GEMMs really ran on every path (SP, SP with the chunked overlap, no SP).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from llama3hp.fp8 import Fp8Config, Fp8Linear
from llama3hp.parallel.tp_comm import TPComm
from tests.parallel.harness import spawn_workers, tp_linear_case

pytestmark = pytest.mark.xdist_group("parallel_fp8_tp")

B, T, D, O = 2, 8, 32, 48
PATHS = {
    "sp": dict(sequence_parallel=True, overlap=False),
    "sp_overlap": dict(sequence_parallel=True, overlap=True, chunks=2),
    "no_sp": dict(sequence_parallel=False, overlap=False),
}


def _linear(weight: torch.Tensor, fp8: bool) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return Fp8Linear.from_linear(lin, Fp8Config(recipe="emulated")) if fp8 else lin


def _one_process(weight, x, dy, fp8: bool):
    lin = _linear(weight, fp8)
    x = x.clone().requires_grad_(True)
    y = lin(x)
    y.backward(dy)
    return y.detach(), x.grad, lin.weight.grad


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _tp_case(case: dict) -> dict:
    """Column- then row-parallel FP8 linear on this rank vs the one-process FP8 and plain linears."""
    comm = TPComm(dist.group.WORLD, **PATHS[case["path"]])
    sp = comm.sequence_parallel
    c = tp_linear_case(B, T, D, O)  # the same full tensors on every rank; this rank's slices
    x, w_col, dy_col, h, w_row, dy_row = c.x, c.w_col, c.dy_col, c.h, c.w_row, c.dy_row
    rows, out_cols = c.rows, c.cols
    out = {}

    # Column-parallel: W [O, D] split over output features.
    ref, plain = _one_process(w_col, x, dy_col, True), _one_process(w_col, x, dy_col, False)
    lin = _linear(w_col[out_cols], True)
    xl = (x[:, rows] if sp else x).clone().requires_grad_(True)
    (y,) = comm.column(xl, [lin])
    y.backward(dy_col[..., out_cols])
    out["col_y"] = (y.detach(), ref[0][..., out_cols], plain[0][..., out_cols])
    out["col_dw"] = (lin.weight.grad, ref[2][out_cols], plain[2][out_cols])
    out["col_dx"] = (xl.grad, ref[1][:, rows] if sp else ref[1], None)

    # Row-parallel: W [D, O] split over input features; the input is this rank's features of h.
    ref, plain = _one_process(w_row, h, dy_row, True), _one_process(w_row, h, dy_row, False)
    lin = _linear(w_row[:, out_cols], True)
    hl = h[..., out_cols].clone().requires_grad_(True)
    y = comm.row(hl, lin)
    y.backward(dy_row[:, rows] if sp else dy_row)
    out["row_dx"] = (hl.grad, ref[1][..., out_cols], plain[1][..., out_cols])
    out["row_dw"] = (lin.weight.grad, ref[2][:, out_cols], plain[2][:, out_cols])
    out["row_y"] = (y.detach(), ref[0][:, rows] if sp else ref[0], None)
    return {k: tuple(None if t is None else t.detach().clone() for t in v) for k, v in out.items()}


@pytest.fixture(scope="module")
def results():
    return spawn_workers(_tp_case, 2, [{"name": p, "path": p} for p in PATHS], timeout_s=120)


@pytest.mark.parametrize("path", list(PATHS))
def test_tp_fp8_gemms_match_one_process_fp8(results, path):
    for rank, per_rank in enumerate(results):
        res = per_rank[path]
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
        for name in ("col_y", "col_dw", "row_dx", "row_dw"):  # whole reduction dims: exact
            got, want, plain = res[name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")
            assert _rel(got, plain) > 1e-3, f"rank {rank} {name}: the plain GEMM ran, not FP8"
        for name in ("col_dx", "row_y"):  # reduced over a TP shard: per-shard scales
            got, want, _ = res[name]
            assert _rel(got, want) < 0.05, f"rank {rank} {name}: relative error {_rel(got, want):.3g}"
