"""Tensor parallelism under autocast, on 2 spawned gloo ranks: the GPU's mixed precision on CPU.

The trainer runs CUDA steps under autocast(bf16) with fp32 master weights. The TP autograd Functions
that run their own GEMMs (the overlapped all-gather/reduce-scatter GEMMs, the chunked vocab-parallel
loss) must run those GEMMs in bf16 in forward AND backward, although on CUDA the backward runs with
autocast off; they must hand back fp32 gradients for the fp32 weights and inputs. Each path is
checked against the one-process linear (or loss) under the same autocast, with backward called
outside autocast as on the GPU, and every GEMM's operand dtypes are recorded.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import llama3hp.kernels as K
from llama3hp.parallel.tp_comm import TPComm
from llama3hp.parallel.vocab_parallel import VocabParallelLinearCrossEntropy
from tests.gemm_dtypes import GemmDtypes
from tests.parallel.harness import spawn_workers, tp_linear_case

pytestmark = pytest.mark.xdist_group("parallel_autocast_tp")

B, T, D, O, V = 2, 8, 32, 48, 96
AMP = torch.bfloat16
PATHS = {
    "sp": dict(sequence_parallel=True, overlap=False),
    "sp_overlap": dict(sequence_parallel=True, overlap=True, chunks=2),
    "no_sp": dict(sequence_parallel=False, overlap=False),
}


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _one_process(weight, x, dy):
    lin, x = _linear(weight), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=AMP):
        y = lin(x)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, lin.weight.grad


def _case(case: dict) -> dict:
    r, tp = dist.get_rank(), dist.get_world_size()
    comm = TPComm(dist.group.WORLD, **PATHS[case["path"]])
    sp = comm.sequence_parallel
    c = tp_linear_case(B, T, D, O)  # the same full tensors on every rank; this rank's slices
    x, w_col, dy_col, h, w_row, dy_row = c.x, c.w_col, c.dy_col, c.h, c.w_row, c.dy_row
    rows, cols = c.rows, c.cols
    out, gemms = {}, GemmDtypes()

    ref = _one_process(w_col, x, dy_col)
    lin = _linear(w_col[cols])
    xl = (x[:, rows] if sp else x).clone().requires_grad_(True)
    with gemms:
        with torch.autocast("cpu", dtype=AMP):
            (y,) = comm.column(xl, [lin])
        y.backward(dy_col[..., cols].to(y.dtype))
    out["col_y"] = (y, ref[0][..., cols])
    out["col_dx"] = (xl.grad, ref[1][:, rows] if sp else ref[1])
    out["col_dw"] = (lin.weight.grad, ref[2][cols])

    ref = _one_process(w_row, h, dy_row)
    lin = _linear(w_row[:, cols])
    hl = h[..., cols].clone().requires_grad_(True)
    with gemms:
        with torch.autocast("cpu", dtype=AMP):
            y = comm.row(hl, lin)
        y.backward((dy_row[:, rows] if sp else dy_row).to(y.dtype))
    out["row_y"] = (y, ref[0][:, rows] if sp else ref[0])
    out["row_dx"] = (hl.grad, ref[1][..., cols])
    out["row_dw"] = (lin.weight.grad, ref[2][:, cols])

    # The chunked vocab-parallel loss as ParallelHead calls it: bf16 rows, this rank's fp32 head shard.
    g = torch.Generator().manual_seed(1)
    hid, head = torch.randn(B * T, D, generator=g), torch.randn(V, D, generator=g) / D**0.5
    tgt = torch.randint(0, V, (B * T,), generator=g)
    tgt[::5] = -100
    hid_r, head_r = hid.clone().requires_grad_(True), head.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=AMP):
        ref_loss = K.linear_cross_entropy(hid_r, head_r, tgt, reduction="sum", backend="torch")
    ref_loss.backward()
    vcols = slice(r * V // tp, (r + 1) * V // tp)
    for fused in (False, True):
        hl, wl = hid.clone().requires_grad_(True), head[vcols].clone().requires_grad_(True)
        with gemms:
            with torch.autocast("cpu", dtype=AMP):
                loss = VocabParallelLinearCrossEntropy.apply(
                    hl.to(AMP), wl, tgt, r * (V // tp), dist.group.WORLD, -100, 0.0, 7, fused, AMP
                ).sum()
            loss.backward()
        out[f"loss_fused{fused}"] = (loss, ref_loss)
        out[f"loss_dw_fused{fused}"] = (wl.grad, head_r.grad[vcols])
        # Each rank's dh is its shard's partial: summed over TP it is the whole gradient.
        dh = hl.grad.clone()
        dist.all_reduce(dh)
        out[f"loss_dh_fused{fused}"] = (dh, hid_r.grad)
    res = {k: tuple(t.detach().clone() for t in v) for k, v in out.items()}
    res["gemms"] = gemms.records
    return res


@pytest.fixture(scope="module")
def results():
    return spawn_workers(_case, 2, [{"name": p, "path": p} for p in PATHS], timeout_s=120)


@pytest.mark.parametrize("path", list(PATHS))
def test_tp_under_autocast_runs_bf16_gemms_and_matches_one_process(results, path):
    for rank, per_rank in enumerate(results):
        res = per_rank[path]
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
        fp32 = [rec for rec in res.pop("gemms") if torch.float32 in rec[1]]
        assert not fp32, f"rank {rank}: GEMMs in fp32 under autocast: {fp32[:4]}"
        for name, (got, want) in res.items():
            expect = AMP if name.endswith("_y") else torch.float32  # outputs bf16, grads fp32, loss fp32
            if name.startswith("loss_fused"):
                expect = torch.float32
            assert got.dtype == expect, f"rank {rank} {name}: dtype {got.dtype}, expected {expect}"
            # bf16 rounding of partial sums (TP splits some reductions): a few bf16 ulps.
            rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert rel < 2e-2, f"rank {rank} {name}: relative error {rel:.3g}"
