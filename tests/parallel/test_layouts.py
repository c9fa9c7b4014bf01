"""Every layout trains like one process: ONE spawned group of 8 gloo ranks runs all cases in sequence
(3 AdamW steps, 2 micro-batches per DP rank, packed documents, grad clipping, weight decay), with
next-token cross-entropy unless a case names another objective.

Switches are checked both ways against the same one-process run: cp_overlap (on by default in the
cp cases), tp_chunked_loss (on in the tp cases), zero3_backward_prefetch (on in the zero3 cases), and
rank-local materialisation (`materialize`: shards equal the whole-then-shard ones bit for bit).
FP8_CASES run the same layouts with the block linears in FP8 against the one-process FP8 run."""

from __future__ import annotations

import math

import pytest
import torch

from tests.parallel.harness import case, spawn_cases

INTERLEAVED_ZERO3 = dict(
    tp=1, cp=1, pp=2, dp=2, zero_stage=3, pp_schedule="interleaved", pp_virtual_stages=2, micro=2
)
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
    case("pp2_interleaved_dp2_zero3", **INTERLEAVED_ZERO3),
    case("materialize_tp2_pp2_dp2_zero3", tp=2, cp=1, pp=2, dp=2, zero_stage=3, materialize=True),
    case("materialize_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32, materialize=True),
    # Activation checkpointing: backward reruns the blocks' forward, collectives included (TP overlap's
    # gathers, CP's K/V all-gather), and under ZeRO-3 after the block's parameters were freed.
    case("ac_tp2_overlap_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32, tp_overlap=True, ac=1),
    case("ac2_pp2_interleaved_dp2_zero3", **INTERLEAVED_ZERO3, ac=2),
    # Objectives handed to the step: SFT's masked cross-entropy, and a nonlinear function of whole
    # documents' log-probabilities (DPO's shape), whose sums cross CP ranks and live on the last stage.
    case("masked_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32, objective="masked"),
    case("masked_dp2_zero3", tp=1, cp=1, pp=1, dp=2, zero_stage=3, objective="masked"),
    case("doclogp_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32, objective="doc_logprob"),
    case("doclogp_cp2_dp2_zero3", tp=1, cp=2, pp=1, dp=2, zero_stage=3, objective="doc_logprob"),
    case(
        "doclogp_tp2_materialized_loss",
        tp=2,
        cp=1,
        pp=1,
        dp=1,
        tp_chunked_loss=False,
        objective="doc_logprob",
    ),
    case(
        "doclogp_pp2_interleaved",
        tp=1,
        cp=1,
        pp=2,
        dp=1,
        pp_schedule="interleaved",
        pp_virtual_stages=2,
        micro=4,
        objective="doc_logprob",
    ),
]
# Post-training: SFT (cross-entropy of the response tokens) and the paper's DPO, its reference the
# step-0 model co-resident on the same layout (run forward only, StepModel.evaluate), pairs packed
# with the shared prompt ([prompt | chosen | rejected]: the attention's shared prefix, RoPE positions
# continuing after the prompt) and apart ([prompt chosen] [prompt rejected]).
DPO = dict(T=32, steps=2)
CASES += [
    case("sft_pp2_interleaved_dp2_zero2", tp=1, cp=1, pp=2, dp=2, zero_stage=2, pp_schedule="interleaved",
         pp_virtual_stages=2, micro=2, objective="masked"),
    case("dpo_shared_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, objective="dpo_shared", **DPO),
    case("dpo_separate_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, objective="dpo_separate", **DPO),
    case("dpo_shared_cp2_dp2_zero3", tp=1, cp=2, pp=1, dp=2, zero_stage=3, objective="dpo_shared", **DPO),
    case("dpo_separate_pp2_interleaved_dp2_zero1", tp=1, cp=1, pp=2, dp=2, zero_stage=1,
         pp_schedule="interleaved", pp_virtual_stages=2, micro=2, objective="dpo_separate", **DPO),
]  # fmt: skip
DPO_CASES = {c["name"] for c in CASES if c.get("objective", "").startswith("dpo")}
AC_CASES = {c["name"] for c in CASES if "ac" in c}

# FP8 (emulated GEMMs on CPU) against the one-process FP8 run. Layouts that only split the rows into
# micro-batches (DP, PP) feed every FP8 GEMM the same tokens and reduction dims as one process: equal
# losses. TP quantizes per shard where a GEMM reduces over a TP shard and CP computes the weight-
# gradient scales over its half of the tokens: equal to FP8 tolerance (GEMM-level exactness is in
# test_fp8_tp.py). Parameters: AdamW turns tiny gradient differences into steps of up to ~lr, so an
# FP8 case's parameters are checked to a few steps of lr.
FP8_CASES = [
    case("fp8_pp2", tp=1, cp=1, pp=2, dp=1, micro=3, fp8="emulated"),
    case("fp8_dp2_zero3", tp=1, cp=1, pp=1, dp=2, zero_stage=3, fp8="emulated"),
    case("fp8_tp2", tp=2, cp=1, pp=1, dp=1, fp8="emulated"),
    case("fp8_tp2_overlap", tp=2, cp=1, pp=1, dp=1, tp_overlap=True, fp8="emulated"),
    case("fp8_tp2_no_sp", tp=2, cp=1, pp=1, dp=1, sequence_parallel=False, fp8="emulated"),
    case("fp8_cp2", tp=1, cp=2, pp=1, dp=1, fp8="emulated"),
    case(
        "fp8_rowwise_materialize_tp2_pp2_dp2",
        tp=2,
        cp=1,
        pp=2,
        dp=2,
        zero_stage=1,
        fp8="rowwise",
        materialize=True,
    ),
]
FP8_SAME_TOKENS = {"fp8_pp2", "fp8_dp2_zero3"}

# Mixed precision as the GPU trainer runs it (autocast bf16, fp32 master weights and residual
# stream), on CPU autocast, against the one-process autocast run. TP and CP split reductions that
# one process does whole, and bf16 rounds the partial sums: equal to a few bf16 ulps. Every GEMM of
# the parallel run, backward included, must be bf16. The FP8 case runs the TP overlap's Fp8Gemms
# on the bf16 activations autocast gives them.
AMP_CASES = [
    case("amp_tp2_overlap", tp=2, cp=1, pp=1, dp=1, tp_overlap=True, amp=torch.bfloat16),
    case("amp_tp2_cp2_pp2", tp=2, cp=2, pp=2, dp=1, T=32, amp=torch.bfloat16),
    case("amp_dp2_zero3_pp2", tp=1, cp=1, pp=2, dp=2, zero_stage=3, amp=torch.bfloat16),
    # bf16 gathers of the blocks' matrices: the GEMMs under autocast read bf16 weights anyway.
    case(
        "amp_dp2_zero3_bf16_gather_tp2",
        tp=2,
        cp=1,
        pp=1,
        dp=2,
        zero_stage=3,
        zero3_gather_dtype="bfloat16",
        amp=torch.bfloat16,
    ),  # fmt: skip
    case("amp_fp8_tp2_overlap", tp=2, cp=1, pp=1, dp=1, tp_overlap=True, fp8="emulated", amp=torch.bfloat16),
    # The recompute runs under the forward's autocast state: its GEMMs are bf16 too.
    case("amp_ac_tp2_overlap", tp=2, cp=1, pp=1, dp=1, tp_overlap=True, amp=torch.bfloat16, ac=1),
]
TOL_LOSS_AMP = 1e-3  # measured: 4.5e-5 relative (TP2 overlap), 3.6e-5 (TP2xCP2xPP2)
TOL_LOSS, TOL_PARAM = 1e-5, 5e-5
TOL_LOSS_FP8_SHARDED, LR = 2e-3, 1e-3


@pytest.fixture(scope="module")
def results():
    return spawn_cases(8, CASES + FP8_CASES + AMP_CASES)


def _ranks(results, name):
    out = []
    for rank, per_rank in enumerate(results):
        r = per_rank[name]
        if r is None:
            continue
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert not r["missing"], f"rank {rank}: parameters missing from the gathered state: {r['missing']}"
        assert not r["init_mismatch"], f"rank {rank}: rank-local shards differ: {r['init_mismatch']}"
        out.append((rank, r))
    assert out, f"no rank ran {name}"
    return out


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_layout_matches_one_process(results, name):
    for rank, r in _ranks(results, name):
        assert r["loss_diff"] < TOL_LOSS * max(r["ref_losses"]), (
            f"rank {rank}: {r['losses']} vs {r['ref_losses']}"
        )
        assert r["param_diff"] < TOL_PARAM * r["param_scale"], f"rank {rank}: param diff {r['param_diff']}"
    if name in AC_CASES:
        assert sum(r["n_checkpointed"] for _, r in _ranks(results, name)) > 0
    if name in DPO_CASES:  # policy = reference at step 0: every margin 0, the DPO part ln 2
        for _, r in _ranks(results, name):
            assert abs(r["dpo_first"] - math.log(2)) < 1e-6 and abs(r["ref_dpo_first"] - math.log(2)) < 1e-6


@pytest.mark.parametrize("name", [c["name"] for c in FP8_CASES])
def test_fp8_layout_matches_one_process_fp8(results, name):
    for rank, r in _ranks(results, name):
        assert r["n_fp8"] > 0, f"rank {rank}: no Fp8Linear in the rank's chunks"
        scale = max(r["ref_losses"])
        if name in FP8_SAME_TOKENS:
            assert r["loss_diff"] < TOL_LOSS * scale, f"rank {rank}: {r['losses']} vs {r['ref_losses']}"
            assert r["fp8_effect"] > 100 * r["loss_diff"], (
                f"rank {rank}: FP8 changed nothing ({r['fp8_effect']})"
            )
        else:
            assert r["loss_diff"] < TOL_LOSS_FP8_SHARDED * scale, (
                f"rank {rank}: {r['losses']} vs {r['ref_losses']}"
            )
        assert r["param_diff"] < 3 * r.get("steps", 3) * LR, f"rank {rank}: param diff {r['param_diff']}"


def test_fp8_tp_overlap_and_no_sp_equal_the_plain_sp_path(results):
    """The three TP paths run the same FP8 GEMMs on the same rows: the same losses to fp32 rounding."""
    for (_, base), (_, ov), (_, nosp) in zip(
        *(_ranks(results, n) for n in ("fp8_tp2", "fp8_tp2_overlap", "fp8_tp2_no_sp"))
    ):
        for other in (ov, nosp):
            assert max(abs(a - b) for a, b in zip(other["losses"], base["losses"])) < 1e-5 * max(
                base["losses"]
            )


@pytest.mark.parametrize("name", [c["name"] for c in AMP_CASES])
def test_autocast_layout_matches_one_process_autocast(results, name):
    fp8 = next(c for c in AMP_CASES if c["name"] == name).get("fp8") is not None
    for rank, r in _ranks(results, name):
        assert r["n_gemms"] > 0
        # The emulated FP8 GEMM multiplies dequantized fp32 operands by design (the GPU runs
        # _scaled_mm on FP8 ones): only the plain cases must have no fp32 GEMM.
        assert fp8 or not r["fp32_gemms"], f"rank {rank}: fp32 GEMMs: {r['fp32_gemms'][:4]}"
        # FP8 under TP quantizes per shard where a GEMM reduces over the shard (measured 3.4e-4).
        tol = TOL_LOSS_FP8_SHARDED if fp8 else TOL_LOSS_AMP
        assert r["loss_diff"] < tol * max(r["ref_losses"]), f"rank {rank}: {r['losses']} vs {r['ref_losses']}"
        assert r["param_diff"] < 3 * r.get("steps", 3) * LR, f"rank {rank}: param diff {r['param_diff']}"
