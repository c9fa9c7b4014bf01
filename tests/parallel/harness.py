"""Spawned gloo ranks for the parallel equivalence tests, and the cases they run.

`spawn_cases(world, cases)` starts ONE group of `world` ranks (loopback TCP, one thread each, a hard
timeout) that runs every case in sequence; a case names a layout, and ranks beyond the layout's size
just take part in group creation. Each case trains a small Llama on packed documents for a few
AdamW steps under the layout and, in the same process, on one process with the plain model, and
reports the largest loss and parameter differences. A `materialize` case builds the model on the meta
device and lets `parallelize(..., init_seed=0)` materialise the rank's shards, and also reports which
of them differ from the whole-then-shard ones.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pickle
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from llama3hp.data.batch import Batch
from llama3hp.fp8 import Fp8Config, Fp8Linear, apply_fp8
from llama3hp.model import ModelArgs, Transformer
from llama3hp.parallel import ParallelConfig, build_mesh, parallelize
from llama3hp.parallel.ac import apply_ac

# A hang guard for the whole group (test_layouts: ~150 s alone on 2 busy cores), not a timing test.
TIMEOUT_S = 360


def small_args(**kw) -> ModelArgs:
    base = dict(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
        ffn_dim_multiplier=None, max_seq_len=64, rope_scaling=False,
    )  # fmt: skip
    base.update(kw)
    return ModelArgs(**base)


@dataclasses.dataclass
class TPLinearCase:
    """The full tensors of a column- then row-parallel linear check (the same on every rank) and this
    rank's slices: `rows` of the sequence (its SP shard), `cols` of the O features (its TP shard)."""

    x: torch.Tensor  # [B, T, D] column-parallel input
    w_col: torch.Tensor  # [O, D]
    dy_col: torch.Tensor  # [B, T, O]
    h: torch.Tensor  # [B, T, O] row-parallel input
    w_row: torch.Tensor  # [D, O]
    dy_row: torch.Tensor  # [B, T, D]
    rows: slice
    cols: slice


def tp_linear_case(B: int, T: int, D: int, O: int) -> TPLinearCase:
    r, tp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    shapes = [(B, T, D), (O, D), (B, T, O), (B, T, O), (D, O), (B, T, D)]
    tensors = [torch.randn(*s, generator=g) for s in shapes]
    return TPLinearCase(
        *tensors, rows=slice(r * T // tp, (r + 1) * T // tp), cols=slice(r * O // tp, (r + 1) * O // tp)
    )


def make_batches(
    step: int, dp: int, micro: int, rows: int, T: int, vocab: int, loss_mask: bool = False
) -> list[list[Batch]]:
    """batches[dp_rank][i]: `micro` micro-batches of `rows` rows per DP rank; packed documents of
    random lengths (crossing CP chunk borders), some ignored targets; with loss_mask, a random loss
    mask too (drawn from a generator of its own: the tokens stay those of the other cases)."""
    g = torch.Generator().manual_seed(1000 + step)
    gm = torch.Generator().manual_seed(2000 + step)
    out = []
    for _ in range(dp):
        mbs = []
        for _ in range(micro):
            tokens = torch.randint(0, vocab, (rows, T + 1), generator=g)
            bounds = [0]
            for r in range(rows):
                cuts = sorted(set(torch.randint(1, T, (3,), generator=g).tolist()))
                bounds += [r * T + c for c in cuts] + [(r + 1) * T]
            targets = tokens[:, 1:].clone()
            targets[torch.rand(targets.shape, generator=g) < 0.1] = -100
            cu = torch.tensor(bounds, dtype=torch.int32)
            mask = torch.rand(targets.shape, generator=gm) < 0.6 if loss_mask else None
            mbs.append(Batch(tokens[:, :-1].contiguous(), targets, cu, int((cu[1:] - cu[:-1]).max()), mask))
        out.append(mbs)
    return out


def make_pair_batches(
    step: int, dp: int, micro: int, rows: int, T: int, vocab: int, shared: bool
) -> list[list[Batch]]:
    """Preference batches as the post-training loader packs them (`llama3hp.data.examples`): per row
    random pairs [prompt | chosen | rejected] (shared prompt) or [prompt chosen] [prompt rejected],
    responses ending in a formatting token, then padding; the same pairs whatever `shared` is."""
    import numpy as np

    from llama3hp.data.examples import build_batch, pair_segments

    g = torch.Generator().manual_seed(3000 + step)
    out = []
    for _ in range(dp):
        mbs = []
        for _ in range(micro):
            packed = []
            for _ in range(rows):
                row, used = [], 0
                while True:
                    P, C, R = (int(x) for x in torch.randint(3, 7, (3,), generator=g))
                    need = 2 * P + C + R  # the separate layout's length: both layouts hold the same pairs
                    if used + need > T:
                        break
                    ids = [torch.randint(0, vocab, (n,), generator=g).numpy() for n in (P, C, R)]
                    roles = [np.zeros(P, np.uint8)] + [
                        np.array([1] * (n - 1) + [2], np.uint8) for n in (C, R)
                    ]
                    segs = pair_segments(ids[0], roles[0], ids[1], roles[1], ids[2], roles[2], shared)
                    row.append((segs, len(row) + 100 * len(mbs)))
                    used += need
                packed.append(row)
            mbs.append(build_batch(packed, T, preference=True, shared_prompt=shared, pad_id=0))
        out.append(mbs)
    return out


def reference_dpo_sum(model: Transformer, model0: Transformer, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's DPO loss summed over the batch's pairs, written without llama3hp.posttrain: per-token
    log-probabilities of the response targets (formatting tokens out) from the plain policy and the
    frozen initial model, summed per segment; and the DPO part alone (for the ln 2 check)."""
    keep = b.loss_mask & ~b.format_mask
    targets = b.targets.masked_fill(~keep, -100)
    kw = dict(cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, doc_prefix=b.doc_prefix)
    seg = torch.searchsorted(b.cu_seqlens[1:].long(), torch.arange(b.inputs.numel()), right=True)
    n_seg = b.cu_seqlens.numel() - 1

    def sums(m):
        logp = -m(b.inputs, targets=targets, reduction="none", **kw)
        return torch.zeros(n_seg).index_add(0, seg, logp)

    with torch.no_grad():
        ref = sums(model0)
    pol = sums(model)
    n = torch.zeros(n_seg).index_add(0, seg, keep.reshape(-1).float())
    c, r = b.pairs[:, 0], b.pairs[:, 1]
    dpo = -F.logsigmoid(0.1 * ((pol[c] - ref[c]) - (pol[r] - ref[r])))
    return (dpo + 0.2 * (-pol[c] / n[c])).sum(), dpo.detach().sum()


class DocumentLogprobLoss:
    """A DPO-like objective for the layout tests: a nonlinear function of each document's summed
    log-probability (softplus(-0.05 log p(doc))), averaged over documents. Under context parallelism
    it needs the whole-document sums on every rank and each document counted once."""

    def count(self, b: Batch) -> torch.Tensor:
        return torch.tensor(float(b.cu_seqlens.numel() - 1))

    def __call__(self, out, b: Batch):
        from llama3hp.train.objectives import ObjectiveOutput

        per_doc = F.softplus(-0.05 * out.document_logprobs(b))
        owned = out.owned_documents(b)
        return ObjectiveOutput((per_doc * owned).sum(), owned.sum().float())


def _reference_targets(b: Batch, objective: str | None) -> torch.Tensor:
    return b.targets.masked_fill(~b.loss_mask, -100) if objective == "masked" else b.targets


def reference_count(b: Batch, objective: str | None) -> torch.Tensor:
    if objective is not None and objective.startswith("dpo"):
        return torch.tensor(float(b.pairs.shape[0]))
    if objective == "doc_logprob":
        return torch.tensor(float(b.cu_seqlens.numel() - 1))
    return (_reference_targets(b, objective) != -100).sum().float()


def reference_loss_sum(model: Transformer, b: Batch, objective: str | None) -> torch.Tensor:
    """The loss sum of `objective` on the plain model, written without the objectives module: the
    cross-entropy of the (masked) targets, or DocumentLogprobLoss from per-token losses."""
    targets = _reference_targets(b, objective)
    kw = dict(cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)
    if objective != "doc_logprob":
        return model(b.inputs, targets=targets, reduction="sum", **kw)
    logp = -model(b.inputs, targets=targets, reduction="none", **kw)
    doc = torch.searchsorted(b.cu_seqlens[1:].long(), torch.arange(logp.numel()), right=True)
    per_doc = torch.zeros(b.cu_seqlens.numel() - 1).index_add(0, doc, logp)
    return F.softplus(-0.05 * per_doc).sum()


def build_objective(name: str | None):
    from llama3hp.posttrain.dpo import DPOLoss
    from llama3hp.train.objectives import MaskedNextTokenLoss, NextTokenLoss

    if name is not None and name.startswith("dpo"):
        return DPOLoss()
    return {None: NextTokenLoss(), "masked": MaskedNextTokenLoss(), "doc_logprob": DocumentLogprobLoss()}[
        name
    ]


def batches_for(objective: str | None, step: int, dp: int, micro: int, rows: int, T: int, vocab: int):
    """The step's batches[dp_rank][i] of an objective: DPO's ("dpo_shared", "dpo_separate") are
    preference pairs, the others packed documents."""
    if objective in ("dpo_shared", "dpo_separate"):
        return make_pair_batches(step, dp, micro, rows, T, vocab, shared=objective == "dpo_shared")
    return make_batches(step, dp, micro, rows, T, vocab, objective == "masked")


def convert_fp8(model: Transformer, recipe: str | None, tp_size: int = 1) -> Transformer:
    """The model with its block linears in FP8 (`recipe`, e.g. "emulated"; None: unchanged)."""
    if recipe is not None:
        assert apply_fp8(model, Fp8Config(recipe=recipe), tp_size=tp_size), "no linear was converted"
    return model


def autocast(amp: torch.dtype | None):
    """CPU autocast to `amp` (the GPU trainer's mixed precision), or nothing for None."""
    return torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()


def reference_run(
    args: ModelArgs,
    steps: int,
    dp: int,
    micro: int,
    rows: int,
    T: int,
    lr: float,
    fp8: str | None = None,
    amp: torch.dtype | None = None,
    objective: str | None = None,
):
    model = Transformer(args)
    model.init_weights(seed=0)
    convert_fp8(model, fp8)
    dpo = objective is not None and objective.startswith("dpo")
    model0 = copy.deepcopy(model) if dpo else None  # the frozen reference: the policy at step 0
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    losses, dpo_first = [], None
    for step in range(steps):
        batches = [
            b
            for per_rank in batches_for(objective, step, dp, micro, rows, T, args.vocab_size)
            for b in per_rank
        ]
        n = sum(reference_count(b, objective) for b in batches)
        total, dpo_part = 0.0, 0.0
        for b in batches:
            with autocast(amp):
                if dpo:
                    loss, part = reference_dpo_sum(model, model0, b)
                    dpo_part += part.item()
                else:
                    loss = reference_loss_sum(model, b, objective)
            (loss / n).backward()
            total += loss.item()
        if step == 0 and dpo:
            dpo_first = dpo_part / n.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total / n.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, dpo_first


def build_whole_then_shard(args: ModelArgs, mesh, cfg: ParallelConfig, fp8: str | None = None):
    model = Transformer(args)
    model.init_weights(seed=0)
    return parallelize(convert_fp8(model, fp8, cfg.tp), mesh, cfg)


def build_rank_local(args: ModelArgs, mesh, cfg: ParallelConfig, fp8: str | None = None):
    with torch.device("meta"):
        model = Transformer(args)
    return parallelize(convert_fp8(model, fp8, cfg.tp), mesh, cfg, init_seed=0)


def shard_mismatches(a, b) -> list[str]:
    """What differs between two ParallelModels' rank-local state: each ZeRO bucket's fp32 shard (the
    rank's TP slice, packed and cut to its DP x CP range; under ZeRO-3 the only copy it holds) and
    the parameter names."""
    bad = [
        f"bucket {i} ({[tuple(p.shape) for p in x.params]})"
        for i, (x, y) in enumerate(zip(a.dp.buckets, b.dp.buckets))
        if not torch.equal(x.shard, y.shard)
    ]
    if len(a.dp.buckets) != len(b.dp.buckets):
        bad.append(f"{len(a.dp.buckets)} vs {len(b.dp.buckets)} buckets")
    return bad + sorted(set(a.named_parameters()) ^ set(b.named_parameters()))


def parallel_run(
    args: ModelArgs,
    cfg: ParallelConfig,
    steps: int,
    micro: int,
    rows: int,
    T: int,
    lr: float,
    materialize: bool,
    fp8: str | None = None,
    amp: torch.dtype | None = None,
    gemms=None,
    ac: int | None = None,
    objective: str | None = None,
):
    mesh = build_mesh(cfg)
    if mesh is None:
        return None
    init_mismatch: list[str] = []
    if materialize:
        pm = build_rank_local(args, mesh, cfg, fp8)
        init_mismatch = shard_mismatches(pm, build_whole_then_shard(args, mesh, cfg, fp8))
    else:
        pm = build_whole_then_shard(args, mesh, cfg, fp8)
    # Activation checkpointing of every ac-th block (the reference run keeps every activation).
    n_checkpointed = apply_ac(pm.chunks, ac)
    n_fp8 = sum(isinstance(m, Fp8Linear) for chunk in pm.chunks for m in chunk.modules())
    opt = torch.optim.AdamW(pm.param_groups(0.1), lr=lr)
    reference = None
    if objective is not None and objective.startswith("dpo"):
        # Co-resident: the frozen step-0 model on the same layout, run forward only (StepModel.evaluate).
        from llama3hp.posttrain.reference import CoResidentReference

        reference = CoResidentReference(build_whole_then_shard(args, mesh, cfg, fp8), mask_format_tokens=True)
    losses, dpo_first = [], None
    for step in range(steps):
        batches = batches_for(objective, step, mesh.dims.dp, micro, rows, T, args.vocab_size)
        if reference is not None:
            reference.annotate(batches[mesh.dp_rank])
        with gemms or contextlib.nullcontext(), autocast(amp):  # as the trainer's mesh step
            result = pm.forward_backward(batches[mesh.dp_rank], build_objective(objective))
        loss = result.loss
        if step == 0 and "dpo" in result.stats:
            dpo_first = result.stats["dpo"].item()
        pm.clip_grad_norm_(1.0)
        opt.step()
        pm.after_optimizer_step()
        pm.zero_grad()
        losses.append(loss.item())
    return losses, pm.full_state_dict(), init_mismatch, n_fp8, n_checkpointed, dpo_first


def compare_case(case: dict) -> dict | None:
    """Train under case["cfg"] and on one process; the largest differences (None off-layout).

    With case["fp8"] (a recipe) both runs convert the block linears to FP8 first, and the result also
    holds `fp8_effect`, how far the one-process FP8 run's losses are from the plain one's.
    With case["amp"] (a dtype) both runs go under CPU autocast, and the result lists the GEMMs of the
    parallel run that had an fp32 operand (`fp32_gemms`). case["objective"] ("masked" or
    "doc_logprob"; default next-token cross-entropy) is what both runs minimise."""
    from tests.gemm_dtypes import GemmDtypes

    args = small_args(**case.get("model", {}))
    cfg = ParallelConfig(**case["cfg"])
    steps, micro, rows, T, lr = (
        case.get("steps", 3),
        case.get("micro", 2),
        case.get("rows", 1),
        case.get("T", 16),
        1e-3,
    )
    fp8, amp = case.get("fp8"), case.get("amp")
    gemms = GemmDtypes() if amp is not None else None
    objective = case.get("objective")
    got = parallel_run(
        args, cfg, steps, micro, rows, T, lr, case.get("materialize", False), fp8, amp, gemms, case.get("ac"),
        objective,
    )  # fmt: skip
    if got is None:
        return None
    dp = cfg.dp
    ref_losses, ref_params, ref_dpo_first = reference_run(
        args, steps, dp, micro, rows, T, lr, fp8, amp, objective
    )
    losses, params, init_mismatch, n_fp8, n_checkpointed, dpo_first = got
    fp8_effect = None
    if fp8 is not None:
        plain_losses, _, _ = reference_run(args, steps, dp, micro, rows, T, lr)
        fp8_effect = max(abs(a - b) for a, b in zip(ref_losses, plain_losses))
    return {
        "n_fp8": n_fp8,
        "n_checkpointed": n_checkpointed,
        "fp8_effect": fp8_effect,
        "losses": losses,
        "ref_losses": ref_losses,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "param_diff": max((params[k] - ref_params[k]).abs().max().item() for k in ref_params),
        "param_scale": max(ref_params[k].abs().max().item() for k in ref_params),
        "missing": sorted(set(ref_params) - set(params)),
        "init_mismatch": init_mismatch,
        "fp32_gemms": gemms.in_dtype(torch.float32) if gemms is not None else [],
        "n_gemms": len(gemms.records) if gemms is not None else 0,
        "dpo_first": dpo_first,  # the DPO part at step 0 (policy = reference: ln 2)
        "ref_dpo_first": ref_dpo_first,
    }


def _rank_main(rank: int, world: int, port: int, run_case, cases: list[dict], out_dir: str, timeout_s: float):
    """One spawned rank: join the gloo group, run every case (errors recorded, not raised, so the
    other ranks are not left waiting), pickle {case name: result} to out_dir/rank<r>.pkl."""
    import datetime

    torch.set_num_threads(1)
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    results = {}
    for case in cases:
        torch.manual_seed(0)
        try:
            results[case["name"]] = run_case(case)
        except BaseException:  # DCP's CheckpointException derives from BaseException
            results[case["name"]] = {"error": traceback.format_exc()}
        dist.barrier()
    tmp = os.path.join(out_dir, f".rank{rank}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(results, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(run_case, world: int, cases: list[dict], timeout_s: float) -> list[dict]:
    """Run run_case(case) for every case on `world` spawned gloo ranks (run_case must be a module-level
    function); per rank, {case name: result or {"error"}}. A hang fails after timeout_s."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, port, run_case, cases, out_dir, timeout_s))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s  # one deadline for the group, not one per rank
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for i in hung:
            procs[i].kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout_s}s (hang in a collective?)")
        out = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} without results")
            with open(path, "rb") as f:
                out.append(pickle.load(f))
        return out


def spawn_cases(world: int, cases: list[dict], timeout_s: float = TIMEOUT_S) -> list[dict]:
    """Run `cases` on `world` spawned gloo ranks; per rank, {case name: result or None or {"error"}}."""
    return spawn_workers(compare_case, world, cases, timeout_s)


def case(name: str, **cfg) -> dict:
    extra = {
        k: cfg.pop(k)
        for k in ("model", "steps", "micro", "rows", "T", "materialize", "fp8", "amp", "ac", "objective")
        if k in cfg
    }
    return {"name": name, "cfg": cfg, **extra}


if __name__ == "__main__":  # quick manual run: python tests/parallel/harness.py
    import sys

    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    res = spawn_cases(world, [case("tp2", tp=2, cp=1, pp=1, dp=1)])
    print(dataclasses.asdict(ParallelConfig()) and res[0])
