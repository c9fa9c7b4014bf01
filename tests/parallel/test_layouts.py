"""Every layout trains like one process: ONE spawned group of 8 gloo ranks runs all cases in sequence
(3 AdamW steps, 2 micro-batches per DP rank, packed documents, grad clipping, weight decay).

Switches are checked both ways against the same one-process run: cp_overlap (on by default in the
cp cases), tp_chunked_loss (on in the tp cases), zero3_backward_prefetch (on in the zero3 cases), and
rank-local materialisation (`materialize`: shards equal the whole-then-shard ones bit for bit)."""

from __future__ import annotations

import pytest

from tests.parallel.harness import case, spawn_cases

CASES = [
    case("tp2", tp=2, cp=1, pp=1, dp=1),
    case("tp2_no_sp", tp=2, cp=1, pp=1, dp=1, sequence_parallel=False),
    case("tp2_overlap", tp=2, cp=1, pp=1, dp=1, tp_overlap=True),
    case("cp2", tp=1, cp=2, pp=1, dp=1),
    case("pp2_1f1b", tp=1, cp=1, pp=2, dp=1, micro=3),
    case("pp2_interleaved", tp=1, cp=1, pp=2, dp=1, pp_schedule="interleaved", pp_virtual_stages=2, micro=4),
    case("dp2_zero0", tp=1, cp=1, pp=1, dp=2, zero_stage=0),
    case("dp2_zero1", tp=1, cp=1, pp=1, dp=2, zero_stage=1),
    case("dp2_zero2", tp=1, cp=1, pp=1, dp=2, zero_stage=2),
    case("dp2_zero3", tp=1, cp=1, pp=1, dp=2, zero_stage=3),
    case("dp2_zero2_no_overlap", tp=1, cp=1, pp=1, dp=2, zero_stage=2, dp_overlap=False),
    case("tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32),
    case("dp2_tp2_pp2", tp=2, cp=1, pp=2, dp=2, zero_stage=2, tp_overlap=True),
    case("cp2_no_overlap", tp=1, cp=2, pp=1, dp=1, cp_overlap=False),
    case("cp2_dp2_zero3", tp=1, cp=2, pp=1, dp=2, zero_stage=3),
    case("tp2_materialized_loss", tp=2, cp=1, pp=1, dp=1, tp_chunked_loss=False),
    case("dp2_zero3_no_bwd_prefetch", tp=1, cp=1, pp=1, dp=2, zero_stage=3, zero3_backward_prefetch=False),
    case(
        "pp2_interleaved_dp2_zero3",
        tp=1,
        cp=1,
        pp=2,
        dp=2,
        zero_stage=3,
        pp_schedule="interleaved",
        pp_virtual_stages=2,
        micro=2,
    ),  # fmt: skip
    case("materialize_tp2_pp2_dp2_zero3", tp=2, cp=1, pp=2, dp=2, zero_stage=3, materialize=True),
    case("materialize_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32, materialize=True),
]

TOL_LOSS, TOL_PARAM = 1e-5, 5e-5


@pytest.fixture(scope="module")
def results():
    return spawn_cases(8, CASES)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_layout_matches_one_process(results, name):
    for rank, per_rank in enumerate(results):
        r = per_rank[name]
        if r is None:
            continue
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert not r["missing"], f"rank {rank}: parameters missing from the gathered state: {r['missing']}"
        assert not r["init_mismatch"], f"rank {rank}: rank-local shards differ: {r['init_mismatch']}"
        assert r["loss_diff"] < TOL_LOSS * max(r["ref_losses"]), (
            f"rank {rank}: {r['losses']} vs {r['ref_losses']}"
        )
        assert r["param_diff"] < TOL_PARAM * r["param_scale"], f"rank {rank}: param diff {r['param_diff']}"
