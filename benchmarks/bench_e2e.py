"""End-to-end training, bf16 vs FP8: a Llama-3-architecture 1B at 8K on one GPU (issue 6).

python -m benchmarks.bench_e2e [--quick] [--out DIR] [--steps 500] [--providers torch llama3hp te]

Each provider trains the same model from the same weights on the same token stream with the
trainer's own building blocks (`llama3hp.train.trainer`: build_model applies FP8 where the trainer
does, build_optimizer, autocast, clipping, the lr schedule of `launch/configs/llama3_1b.toml`):
- torch: the bf16 baseline (fp8.recipe=none);
- llama3hp: FP8 row-wise (fp8.recipe=rowwise: Triton quantization, torch._scaled_mm);
- te: Transformer Engine delayed scaling (fp8.recipe=te_delayed), when it imports.

Data: the default corpus (the prepared stdlib corpus, data/stdlib-<tokenizer sha>/) when it is
there, else a synthetic token stream (Zipf-sampled phrases, so the loss can fall); the row says
which. Timing: each optimizer step's forward, backward and whole step (forward + backward +
clip + AdamW) are timed with a device sync around each phase; the medians over the steps after
`--warmup` are the fwd, bwd and fwd+bwd rows. TFLOP/s counts the model FLOPs of that phase
(forward 1/3, backward 2/3 of `flops_per_token`); the fwd+bwd row also carries tokens/s, MFU
against the bf16 peak, the FP8 peak and the mixed peak (`llama3hp.train.metrics`), peak memory,
the loss after N steps (mean of the last 10 steps) and, on FP8 rows, the tokens/s ratio and the
relative loss difference against the bf16 run. Targets (H100, not asserted): bf16 MFU >= 55%,
FP8 >= 1.35x bf16 tokens/s with the loss within 1% after 500 steps.

--quick: a shrunk model (dim 64, 2 layers, vocab 256, seq 64, 5 steps) on CPU in fp32 with the
emulated FP8 GEMM, on the synthetic stream, in seconds.
"""

from __future__ import annotations

import gc
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import Benchmark, Unavailable

NAME = "e2e"
RECIPES = {"torch": "none", "llama3hp": "rowwise", "te": "te_delayed"}
QUICK_OVERRIDES = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "model.multiple_of=64",
    "training.seq_len=64",
    "training.micro_batch_rows=2",
    "training.global_batch_rows=2",
    "training.warmup_steps=1",
    "training.lr=3e-3",
    "training.device=cpu",
    "training.dtype=float32",
]
LOSS_WINDOW = 10  # "loss after N steps" = mean of the last LOSS_WINDOW step losses (one step is noisy)
TARGET_MFU, TARGET_SPEEDUP, TARGET_LOSS = 0.55, 1.35, 0.01


def build_job(quick: bool, steps: int, extra: list[str]):
    from llama3hp.config import load_job_config

    overrides = [*(QUICK_OVERRIDES if quick else []), f"training.steps={steps}", *extra]
    return load_job_config("llama3_1b", overrides)


# ---------------------------------------------------------------------------------------------- data


def synthetic_batches(vocab: int, rows: int, seq_len: int, seed: int = 0):
    """Endless Batch objects of `rows` x `seq_len` tokens, one document per row: phrases of 8 tokens
    drawn with Zipf weights from 4,096 random phrases, so there is structure to learn."""
    from llama3hp.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(0, vocab, (4096, 8), generator=g)
    weights = 1.0 / torch.arange(1, 4097, dtype=torch.float64)
    per_row = math.ceil((seq_len + 1) / 8)
    cu = torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32)
    while True:
        idx = torch.multinomial(weights, rows * per_row, replacement=True, generator=g)
        stream = phrases[idx].view(rows, -1)[:, : seq_len + 1]
        yield Batch(stream[:, :-1].contiguous(), stream[:, 1:].contiguous(), cu, seq_len)


def build_data(job, quick: bool):
    """(a function giving the next micro-batch, a description of the source)."""
    t = job.training
    if not quick:
        try:
            import dataclasses

            from llama3hp.data import Tokenizer, build_loader
            from llama3hp.train.build import resolve_datasets

            tok = Tokenizer.load(job.data.tokenizer_path)
            datasets = resolve_datasets(job, tok)  # prepares the stdlib corpus once (seconds)
            loader = build_loader(
                dataclasses.replace(job.data, datasets=datasets), tokenizer_sha256=tok.sha256
            )
            return (lambda: loader.next_batch(t.micro_batch_rows, t.seq_len)), f"corpus {', '.join(datasets)}"
        except Exception as e:  # noqa: BLE001 - no tokenizer package: fall back to synthetic tokens
            why = f"tokenizer or corpus unavailable ({type(e).__name__}: {str(e)[:120]})"
    else:
        why = "--quick"
    it = synthetic_batches(job.model.vocab_size, t.micro_batch_rows, t.seq_len, seed=job.data.seed)
    return (lambda: next(it)), f"synthetic Zipf phrases ({why})"


# ---------------------------------------------------------------------------------------------- run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_provider(job, provider: str, quick: bool, warmup: int) -> dict[str, Any]:
    """Train `job.training.steps` steps with the provider's FP8 recipe; medians and the loss curve."""
    import dataclasses

    from llama3hp.data.batch import IGNORE_INDEX
    from llama3hp.model.flops import flops_per_token
    from llama3hp.parallel import ParallelContext
    from llama3hp.train import build as B
    from llama3hp.train import metrics as M
    from llama3hp.train.schedules import LRSchedule, lr_at

    recipe = RECIPES[provider]
    if recipe.startswith("te_"):
        from llama3hp.fp8 import te_available

        if not te_available():
            raise Unavailable("transformer_engine not installed")
    job = dataclasses.replace(job, fp8=job.fp8.replace(recipe=recipe))
    t = job.training
    device = B.select_device(t.device)
    if recipe.startswith("te_") and device.type != "cuda":
        raise Unavailable("Transformer Engine runs on CUDA only")
    ctx = ParallelContext()
    B.check_fp8(job, ctx, device)
    B.seed_everything(t.seed)
    amp = B.autocast_dtype(t.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    next_batch, source = build_data(job, quick)
    # FP8 applied inside, where the trainer applies it. The loop below times forward and backward
    # apart, so it drives the plain module rather than the step interface.
    step_model = B.build_model(job, device, ctx)
    model = step_model.chunks[0]
    from llama3hp.fp8 import fp8_flops_per_token

    fp8_fqns = step_model.fp8_linear_names()
    optimizer = B.build_optimizer(step_model, t, device)
    schedule = LRSchedule(t.lr, t.steps, t.warmup_steps, t.min_lr_ratio)
    accum = t.grad_accum_steps()
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else None
    fwd_s, bwd_s, step_s, losses, fpts = [], [], [], [], []
    for step in range(t.steps):
        batches = [next_batch().to(device) for _ in range(accum)]
        n_targets = sum((b.targets != IGNORE_INDEX).sum() for b in batches).float().clamp(min=1.0)
        _sync(device)
        t_start = time.perf_counter()
        t_fwd = t_bwd = 0.0
        loss_sum = torch.zeros((), device=device)
        for b in batches:
            t0 = time.perf_counter()
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                loss = model(b.inputs, targets=b.targets, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                             reduction="sum")  # fmt: skip
            _sync(device)
            t1 = time.perf_counter()
            (loss / n_targets).backward()
            _sync(device)
            t_fwd, t_bwd = t_fwd + t1 - t0, t_bwd + time.perf_counter() - t1
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"), foreach=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(schedule, step, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((loss_sum / n_targets).item())
        _sync(device)
        if step >= warmup:
            fwd_s.append(t_fwd)
            bwd_s.append(t_bwd)
            step_s.append(time.perf_counter() - t_start)
            fpts.append(
                flops_per_token(
                    job.model, t.seq_len, [n for b in batches for n in M.doc_lengths(b.cu_seqlens)]
                )
            )
    peak_mem = M.peak_memory_bytes(device) / 2**30 if device.type == "cuda" else None
    fp8_fpt = fp8_flops_per_token(job.model, fqns=fp8_fqns) if fp8_fqns else 0.0
    del model, step_model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "device": device,
        "tokens_per_step": accum * t.micro_batch_rows * t.seq_len,
        "fwd_s": statistics.median(fwd_s),
        "bwd_s": statistics.median(bwd_s),
        "step_s": statistics.median(step_s),
        "flops_per_token": statistics.fmean(fpts),
        "fp8_flops_per_token": fp8_fpt,
        "n_fp8_linears": len(fp8_fqns),
        "losses": losses,
        "peak_mem_gib": peak_mem,
        "data": source,
        "recipe": recipe,
    }


def provider_rows(provider: str, res: dict[str, Any], shape: dict, peaks: dict, base: dict) -> list[dict]:
    """The fwd, bwd and fwd+bwd rows of one provider's run (e2e columns on the fwd+bwd row)."""
    from llama3hp.train import metrics as M

    device, fpt, tokens = res["device"], res["flops_per_token"], res["tokens_per_step"]
    rows = []
    for mode, seconds, share in (("fwd", res["fwd_s"], 1 / 3), ("bwd", res["bwd_s"], 2 / 3), ("fwd+bwd", res["step_s"], 1.0)):  # fmt: skip
        tflops = share * fpt * tokens / seconds / 1e12
        row = {**base, "provider": provider, "mode": mode, "ms": 1e3 * seconds, "metric": "TFLOP/s"}
        row |= {
            "value": tflops,
            "frac_of_peak": tflops / peaks["matmul_tflops"],
            "peak_mem_mb": None,
            **peaks,
        }
        if res["peak_mem_gib"] is not None:
            row["peak_mem_mb"] = res["peak_mem_gib"] * 1024
        rows.append(row)
    e2e = rows[-1]
    tok_s = tokens / res["step_s"]
    if device.type == "cuda":
        p16 = M.gpu_peak_flops(torch.cuda.get_device_name(device)) or peaks["matmul_tflops"] * 1e12
    else:
        p16 = peaks["matmul_tflops"] * 1e12  # CPU: the fp32 matmul rate measured in this run
    p8, note = M.fp8_peak_flops(device, p16)
    window = res["losses"][-LOSS_WINDOW:]
    e2e |= {
        "recipe": res["recipe"],
        "data": res["data"],
        "steps": len(res["losses"]),
        "tokens_per_s": tok_s,
        "flops_per_token": fpt,
        "peak_bf16_tflops": p16 / 1e12,
        "peak_fp8_tflops": p8 / 1e12 if p8 else None,
        "n_fp8_linears": res["n_fp8_linears"],
        "peak_mem_gib": res["peak_mem_gib"],
        "loss_first": res["losses"][0],
        "loss_final": statistics.fmean(window),
        "losses": res["losses"],
        **M.fp8_fields(tok_s, fpt, res["fp8_flops_per_token"], p16, p8, note=note),
    }
    e2e["mfu"] = e2e["mfu_bf16"]
    return rows


def compare(rows: list[dict]) -> None:
    """Adds, to every FP8 fwd+bwd row, the tokens/s ratio and relative loss difference against bf16."""
    e2e = {r["provider"]: r for r in rows if r["mode"] == "fwd+bwd" and "ms" in r}
    base = e2e.get("torch")
    for name, r in e2e.items():
        r["target_mfu_bf16"] = TARGET_MFU
        if base is None or name == "torch":
            continue
        r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["loss_diff_vs_bf16"] = (r["loss_final"] - base["loss_final"]) / base["loss_final"]
        r["target_speedup"], r["target_loss_diff"] = TARGET_SPEEDUP, TARGET_LOSS


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def e2e_table(rows: list[dict]) -> str:
    """The end-to-end table: one line per provider, with the targets as columns."""
    cols = [
        "provider", "recipe", "data", "steps", "tokens/s", "MFU bf16 peak", "MFU FP8 peak", "MFU mixed",
        "FP8 share", "peak mem GiB", "loss after N", "tok/s vs bf16 (target >= 1.35x)",
        "loss diff vs bf16 (target within 1%)", "bf16 MFU target >= 55%",
    ]  # fmt: skip
    lines = ["## End to end", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["mode"] != "fwd+bwd" or "ms" not in r:
            continue
        mem = r.get("peak_mem_gib")
        cells = [
            r["provider"], r["recipe"], r["data"], str(r["steps"]), f"{r['tokens_per_s']:,.0f}",
            _pct(r["mfu_bf16"]), _pct(r.get("mfu_fp8")), _pct(r.get("mfu_mixed")), _pct(r["fp8_share"]),
            "-" if mem is None else f"{mem:.1f}", f"{r['loss_final']:.4f}",
            f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "-",
            f"{100 * r['loss_diff_vs_bf16']:+.2f}%" if "loss_diff_vs_bf16" in r else "-",
            ("met" if r["mfu_bf16"] >= TARGET_MFU else "not met") if r["provider"] == "torch" else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r.get("fp8_mfu_note") for r in rows if r.get("fp8_mfu_note")]
    lines += ["", *[f"- {n}" for n in dict.fromkeys(notes)]]
    lines += [f"- loss after N = mean loss of the last {LOSS_WINDOW} steps; MFU of the median step."]
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> tuple[list[dict], dict, Path]:
    p = harness.build_parser("end-to-end training benchmark: bf16 vs FP8")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per provider (500; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (10; --quick 1)")
    p.add_argument(
        "--set", nargs="*", default=[], help="extra config overrides, e.g. training.micro_batch_rows=1"
    )
    args = p.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("bench_e2e: the full-size run needs a CUDA GPU; use --quick on CPU")
    steps = args.steps or (5 if args.quick else 500)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
    if not 0 <= warmup < steps:
        raise SystemExit(f"bench_e2e: --warmup ({warmup}) must be below --steps ({steps})")
    job = build_job(args.quick, steps, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    peaks = harness.measure_peaks(device, args.quick)
    t = job.training
    shape = {"model": "llama3_1b" if not args.quick else "llama3_1b-shrunk", "dim": job.model.dim,
             "layers": job.model.n_layers, "seq": t.seq_len, "rows": t.global_batch_rows}  # fmt: skip
    from llama3hp.train.build import autocast_dtype

    dtype = "bfloat16" if autocast_dtype(t.dtype, device) is not None else "float32"
    env = harness.environment(device, args.quick)
    base = {"bench": NAME, "shape": shape, "shape_str": harness.shape_str(shape), "dtype": dtype, **env}
    rows = []
    for provider in args.providers or list(RECIPES):
        if provider not in RECIPES:
            raise SystemExit(f"bench_e2e: unknown provider {provider!r}: choose from {', '.join(RECIPES)}")
        try:
            res = train_provider(job, provider, args.quick, warmup)
            new = provider_rows(provider, res, shape, peaks, base)
        except Unavailable as e:
            new = [{**base, "provider": provider, "mode": m, "skipped": str(e)} for m in harness.MODES]
        except Exception as e:  # noqa: BLE001 - a failing provider must not abort the others
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            new = [{**base, "provider": provider, "mode": m, "error": msg} for m in harness.MODES]
        for r in new:
            print(harness.row_line(r), flush=True)
        rows += new
    compare(rows)
    if args.out is not None:
        out_dir = args.out
    elif args.quick:
        out_dir = Path(tempfile.mkdtemp(prefix="llama3hp-bench-"))
    else:
        out_dir = harness.RESULTS_DIR / harness.device_slug(device)
    return rows, peaks, out_dir


BENCH = Benchmark(
    name=NAME,
    shapes=[],
    quick_shapes=[],
    make_inputs=None,
    providers={},
    work=None,
    metric="TFLOP/s",
    memory=True,
    notes=[
        "fwd, bwd: medians of each step's forward and backward time; fwd+bwd: the whole optimizer step",
        "llama3hp = FP8 row-wise, torch = bf16 baseline, te = Transformer Engine delayed scaling",
    ],
)


def main(argv: list[str] | None = None) -> Path:
    rows, peaks, out_dir = run(argv)
    json_path, md_path = harness.write_results(BENCH, rows, peaks, out_dir, extra_md=e2e_table(rows))
    # The shared writer's table plus the end-to-end one, rewritten atomically in place.
    print(f"wrote {json_path} and {md_path}")
    print(e2e_table(rows))
    return out_dir


if __name__ == "__main__":
    main()
