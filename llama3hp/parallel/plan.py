"""Step-time and memory model of a 4D layout (`llama3hp plan MODEL --tp --cp --pp --dp --seq --batch`).

Per GPU and per optimizer step:
- compute: model FLOPs (llama3hp.model.flops, causal attention pairs only) / (peak x efficiency),
  with separate efficiencies for the matmuls and for attention;
- pipeline bubble: compute x (pp-1)/(virtual x m) (interleaved 1F1B; virtual=1 is plain 1F1B,
  whose bubble fraction is (pp-1)/(m+pp-1)), m micro-batches per DP rank;
- exposed communication: bytes / link bandwidth x the fraction not hidden behind compute.
  TP: per layer and micro-batch 4 all-gathers/reduce-scatters forward and 4 backward of the
  [b, s/cp, D] bf16 activations, on NVLink. CP: all-gather of K and V forward (and of K, V for the
  recompute-free backward), reduce-scatter of dK, dV backward. PP: one activation and one gradient
  per micro-batch and virtual stage boundary. CP, PP and DP use the scale-out network unless the
  group fits in one node (then NVLink). DP, over DP x CP, as `ZeroDataParallel` moves fp32:
  zero_stage 0 all-reduces the gradients once per step, 1 also all-gathers the updated parameters;
  2 reduce-scatters the gradients after every micro-batch and all-gathers the parameters once;
  3 reduce-scatters after every micro-batch and all-gathers each block before its forward and its
  backward (its matrices in bf16 with zero3_gather_dtype).
Memory, as `ZeroDataParallel` holds it: fp32 weights (autocast casts them per GEMM), sharded at
zero_stage 3; fp32 gradient accumulators, whole at 0-1 (one reduction per step), sharded from 2
(reduced after every micro-batch); Adam's moments, with an fp32 master shard from zero_stage 1,
sharded over DP x CP from 1; activations per layer of 34*s*b*D/tp bytes
(Korthikanti et al. 2022, sequence parallel, flash attention) or, for a block under full activation
checkpointing (`training.activation_checkpointing`), its fp32 input alone, 4*s*b*D/tp, times the
layers of a stage times the peak in-flight micro-batches of the simulated schedule. Checkpointed
blocks rerun their forward in backward: a third more of their compute (and bubble), not model FLOPs.

The efficiencies and exposure fractions below are assumptions (H100 SXM, 8 GPUs per node on
NVLink 4, one 400 Gb/s NIC per GPU), chosen once so that the paper's three 405B layouts land at
43/41/38% MFU; they are not fitted per layout.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

from llama3hp.model import ModelArgs, get_model_args
from llama3hp.model.flops import flops_fraction_attention, flops_per_token
from llama3hp.parallel.mesh import ParallelConfig, ParallelDims, validate_layout
from llama3hp.parallel.pipeline import simulate


@dataclass
class Hardware:
    """Assumed machine and kernel efficiencies."""

    peak_tflops: float = 989.0  # H100 SXM dense bf16
    gemm_efficiency: float = 0.52  # achieved fraction of peak in the block matmuls
    attention_efficiency: float = 0.40  # FlashAttention-class fraction of peak
    nvlink_gbs: float = 360.0  # achieved NVLink bus bandwidth per GPU (GB/s)
    network_gbs: float = 40.0  # achieved scale-out bandwidth per GPU (400 Gb/s RoCE/IB, GB/s)
    tp_exposed: float = 0.3  # share of TP traffic not overlapped (async TP hides the rest)
    cp_exposed: float = 0.5  # share of the K/V all-gather time not hidden
    pp_exposed: float = 0.2  # share of p2p time not hidden by async send/recv
    dp_exposed: float = 0.1  # share of the gradient/parameter traffic left after overlap
    hbm_gib: float = 80.0  # memory per GPU (an H100's 80 GiB)
    gpus_per_node: int = 8  # a group whose ranks all sit in one node talks over NVLink

    def link_gbs(self, span: int) -> float:
        """Bandwidth of a group whose ranks lie within `span` consecutive ranks (mesh order [TP, CP,
        PP, DP]: a CP group spans tp*cp, a PP group tp*cp*pp, a DP group the whole world)."""
        return self.nvlink_gbs if span <= self.gpus_per_node else self.network_gbs


@dataclass
class PlanReport:
    model: str
    tp: int
    cp: int
    pp: int
    dp: int
    gpus: int
    seq: int
    global_rows: int
    micro_rows: int
    microbatches: int
    virtual: int
    compute_s: float
    bubble_s: float
    tp_s: float
    cp_s: float
    pp_s: float
    dp_s: float
    step_s: float
    tflops_per_gpu: float
    mfu: float
    bubble_fraction: float
    peak_in_flight: float
    mem_weights_gib: float
    mem_grads_gib: float
    mem_optimizer_gib: float
    mem_activations_gib: float
    mem_total_gib: float


def plan(
    model: str, tp: int, cp: int, pp: int, dp: int, seq: int, global_rows: int, *, micro_rows: int = 1,
    virtual: int = 1, zero_stage: int = 1, checkpointing: str = "none", checkpoint_every: int = 1,
    zero3_gather_dtype: str = "float32", hw: Hardware | None = None, args: ModelArgs | None = None,
) -> PlanReport:  # fmt: skip
    """Predict memory and step time of `model` (a preset name, or the name of `args` when given) under
    the layout; see module docstring."""
    hw = hw or Hardware()
    args = args or get_model_args(model)
    dims = ParallelDims(tp, cp, pp, dp)
    sched = "interleaved" if virtual > 1 else "1f1b"
    cfg = ParallelConfig(
        tp=tp, cp=cp, pp=pp, dp=dp, pp_schedule=sched, pp_virtual_stages=virtual, zero_stage=zero_stage,
        zero3_gather_dtype=zero3_gather_dtype,
    )  # fmt: skip
    validate_layout(cfg, dims, args, seq)
    if global_rows % (dp * micro_rows):
        raise ValueError(
            f"global batch {global_rows} rows is not divisible by dp*micro_rows = {dp * micro_rows}"
        )
    if checkpointing not in ("none", "full"):
        raise ValueError(f"checkpointing must be 'none' or 'full', got {checkpointing!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    m = global_rows // (dp * micro_rows)
    gpus = dims.world_size
    tokens = global_rows * seq
    fpt = flops_per_token(args, seq)
    attn_frac = flops_fraction_attention(args, seq)
    peak = hw.peak_tflops * 1e12
    flops_gpu = fpt * tokens / gpus
    compute = flops_gpu * (1 - attn_frac) / (peak * hw.gemm_efficiency) + flops_gpu * attn_frac / (
        peak * hw.attention_efficiency
    )
    # Blocks whose layer id is a multiple of checkpoint_every rerun their forward (a third of their
    # forward + backward) in backward; the output head is never checkpointed.
    ckpt_frac = (
        0.0 if checkpointing == "none" else ((args.n_layers - 1) // checkpoint_every + 1) / args.n_layers
    )
    head_frac = 6 * args.dim * args.vocab_size / fpt
    compute += compute * (1 - head_frac) / 3 * ckpt_frac
    bubble = compute * (pp - 1) / (virtual * m)
    layers_rank = args.n_layers / pp
    s_local = seq // cp
    act_bytes = micro_rows * s_local * args.dim * 2  # one bf16 activation [b, s/cp, D]
    tp_bytes = 8 * act_bytes * (tp - 1) / tp * layers_rank * m
    tp_s = hw.tp_exposed * tp_bytes / (hw.nvlink_gbs * 1e9)
    kv_bytes = micro_rows * s_local * args.n_kv_heads * args.head_dim * 2 // max(1, min(tp, args.n_kv_heads))
    cp_bytes = (
        2 * kv_bytes * (cp - 1) * 3 * layers_rank * m
    )  # K and V: gather fwd, gather + reduce-scatter bwd
    cp_s = hw.cp_exposed * cp_bytes / (hw.link_gbs(tp * cp) * 1e9)
    pp_bytes = 2 * (act_bytes / tp) * m * virtual if pp > 1 else 0.0
    pp_s = hw.pp_exposed * pp_bytes / (hw.link_gbs(tp * cp * pp) * 1e9)
    params = sum_params(args)
    p_local = params / (tp * pp)
    rep = dp * cp
    # fp32 bytes per local parameter that each DP x CP rank sends (ring collectives).
    gather = 2 if zero3_gather_dtype == "bfloat16" else 4  # ZeRO-3 gathers (the matrices: ~all of it)
    per_param = {0: 2 * 4, 1: 2 * 4 + 4, 2: m * 4 + 4, 3: m * 4 + 2 * m * gather}[zero_stage]
    dp_bytes = per_param * p_local * (rep - 1) / rep
    dp_s = hw.dp_exposed * dp_bytes / (hw.link_gbs(gpus) * 1e9)
    step = compute + bubble + tp_s + cp_s + pp_s + dp_s
    mfu = fpt * tokens / (step * gpus * peak)
    stats = simulate(sched, pp, virtual, m) if pp > 1 else None
    in_flight = stats.peak_in_flight[0] if stats else 1.0
    per_layer = (34 * (1 - ckpt_frac) + 4 * ckpt_frac) * micro_rows * s_local * args.dim / tp
    gib = 2**30
    weights = 4 * p_local / (rep if zero_stage == 3 else 1)
    grads = 4 * p_local / (rep if zero_stage >= 2 else 1)
    optim = (12 * p_local / rep) if zero_stage >= 1 else 8 * p_local  # (master +) two moments
    acts = per_layer * layers_rank * in_flight
    return PlanReport(
        model, tp, cp, pp, dp, gpus, seq, global_rows, micro_rows, m, virtual,
        compute, bubble, tp_s, cp_s, pp_s, dp_s, step, fpt * tokens / gpus / step / 1e12, mfu,
        bubble / step, in_flight, weights / gib, grads / gib, optim / gib, acts / gib,
        (weights + grads + optim + acts) / gib,
    )  # fmt: skip


def sum_params(args) -> float:
    d, hd, f = args.dim, args.head_dim, args.ffn_dim
    block = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * d * f + 2 * d
    head = 0 if args.tie_embeddings else args.vocab_size * d
    return args.n_layers * block + args.vocab_size * d + head + d


def format_report(r: PlanReport) -> str:
    lines = [
        f"{r.model}: TP{r.tp} CP{r.cp} PP{r.pp} DP{r.dp} on {r.gpus} GPUs, seq {r.seq}, "
        f"{r.global_rows} rows/step, {r.microbatches} micro-batches of {r.micro_rows} row(s), virtual stages {r.virtual}",
        f"  step {r.step_s:.2f} s = compute {r.compute_s:.2f} + bubble {r.bubble_s:.2f} + TP {r.tp_s:.2f} "
        f"+ CP {r.cp_s:.2f} + PP {r.pp_s:.2f} + DP {r.dp_s:.2f}",
        f"  {r.tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {100 * r.mfu:.1f}%, bubble {100 * r.bubble_fraction:.1f}% of the step",
        f"  memory per GPU: weights {r.mem_weights_gib:.1f} GiB, grads {r.mem_grads_gib:.1f} GiB, optimizer "
        f"{r.mem_optimizer_gib:.1f} GiB, activations {r.mem_activations_gib:.1f} GiB "
        f"({r.peak_in_flight:.2f} micro-batches in flight), total {r.mem_total_gib:.1f} GiB of {Hardware.hbm_gib:.0f}",
    ]
    return "\n".join(lines)


def schedule_table(pp: int, m: int, virtual: int) -> str:
    """Bubble fraction and peak in-flight activations of each schedule (simulated)."""
    rows = ["schedule      pp  m  v  bubble  (pp-1)/(m+pp-1)  peak in-flight (rank 0, micro-batches)"]
    for kind, v in (("1f1b", 1), ("interleaved", virtual)):
        if kind == "interleaved" and v < 2:
            continue
        s = simulate(kind, pp, v, m)
        rows.append(
            f"{kind:<12} {pp:>3} {m:>2} {v:>2}  {s.bubble:.3f}   {(pp - 1) / (m + pp - 1):.3f}            {s.peak_in_flight[0]:.2f}"
        )
    return "\n".join(rows)


PAPER_LAYOUTS = {
    # (tp, cp, pp, dp, seq, global rows): 16M-token batches; the paper's MFU 43 / 41 / 38%.
    "405b_8k_8192gpus": (8, 1, 16, 64, 8192, 2048),
    "405b_8k_16384gpus": (8, 1, 16, 128, 8192, 2048),
    "405b_128k_8192gpus": (8, 16, 16, 4, 131072, 128),
}


def main(argv: list[str] | None = None) -> int:
    """`llama3hp plan`: print the predicted step time, MFU and memory, and the schedule table."""
    ap = argparse.ArgumentParser(prog="llama3hp plan", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model preset, e.g. llama3_405b")
    for name, default in (
        ("tp", 1),
        ("cp", 1),
        ("pp", 1),
        ("dp", 1),
        ("seq", 8192),
        ("batch", 2048),
        ("micro", 1),
        ("virtual", 1),
        ("zero", 1),
    ):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument(
        "--checkpointing", default="none", choices=("none", "full"), help="activation checkpointing"
    )
    ap.add_argument(
        "--checkpoint-every", type=int, default=1, help="with --checkpointing full: every N-th block"
    )
    ap.add_argument(
        "--zero3-gather", default="float32", choices=("float32", "bfloat16"), help="ZeRO-3 gathers"
    )
    a = ap.parse_args(argv)
    try:
        r = plan(a.model, a.tp, a.cp, a.pp, a.dp, a.seq, a.batch, micro_rows=a.micro, virtual=a.virtual,
                 zero_stage=a.zero, checkpointing=a.checkpointing, checkpoint_every=a.checkpoint_every,
                 zero3_gather_dtype=a.zero3_gather)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    if a.pp > 1:
        print(schedule_table(a.pp, r.microbatches, max(a.virtual, 2)))
    print(f"assumptions: {asdict(Hardware())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
