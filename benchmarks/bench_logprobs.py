"""DPO's loss from hidden states at vocabulary 128,256: the fused chunked log-probabilities
(kernels/logprobs.py) against the materialised logits and Liger-Kernel's fused linear DPO loss.

python -m benchmarks.bench_logprobs [--quick] [--out DIR]      # GPU (or --quick: interpreter shapes)
python -m benchmarks.bench_logprobs --cpu [--out DIR]           # CPU: time and peak RSS, results/cpu/
python -m benchmarks.bench_logprobs --max-fit [--out DIR]       # GPU: the most tokens each provider fits

Every provider computes the same thing from hidden [2B*T, D] and the head [V, D]: the summed
log-probabilities of B chosen and B rejected sequences of T tokens (the first quarter of each, the
prompt, not scored), then the paper's DPO loss (beta 0.1, NLL weight 0.2, reference values 0). Ours:
`linear_logprobs` with cu_seqlens + `llama3hp.posttrain.dpo.dpo_loss`; torch: the same sums from
materialised fp32 logits; Liger: `LigerFusedLinearDPOLoss(use_ref_model=False, compute_nll_loss=True)`
(its NLL is the mean over all chosen tokens rather than per pair, so its loss differs slightly: the
agreement column shows by how much). Work: the three head GEMMs (6 N D V FLOPs for fwd+bwd).

Issue targets (H100, not asserted): peak memory <= 25% of the materialised path's, >= 1.0x Liger's
speed, and >= 4x the longest sequence that fits (the GPU session measures it).

On CPU (`--cpu`) each provider runs in a process of its own: median seconds of fwd+bwd and the peak
RSS above the same process holding only its inputs. Ours runs the chunked Function with torch
reductions there (what a TP rank runs off CUDA; one process off CUDA defaults to the reference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import Benchmark, compiled, import_or_unavailable

SEQ = 1024  # tokens per sequence on the GPU shapes (8K tokens = 4 pairs, 32K = 16 pairs)


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, d, v, t = shape["tokens"], shape["hidden"], shape["vocab"], shape["seq"]
    targets = torch.randint(0, v, (n // t, t), device=device)
    targets[:, : t // 4] = -100  # the prompt
    return {
        "hidden": torch.randn(n, d, device=device, dtype=dtype, requires_grad=True),
        "weight": (torch.randn(v, d, device=device, dtype=dtype) / d**0.5).requires_grad_(),
        "targets": targets.reshape(-1),
    }


def _dpo(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    from llama3hp.posttrain.dpo import dpo_loss

    b = sums.numel() // 2
    zero = torch.zeros(b, device=sums.device)
    return dpo_loss(sums[:b], sums[b:], zero, zero, counts[:b]).loss.mean()


def _seqs(inp: dict, shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    t = shape["seq"]
    n = inp["targets"].numel()
    cu = torch.arange(0, n + 1, t, device=inp["targets"].device, dtype=torch.int32)
    counts = (inp["targets"].view(-1, t) != -100).sum(1).float()
    return cu, counts


def _ours(inp, shape, chunked_torch: bool = False):
    from llama3hp.kernels.logprobs import LinearLogprobsFunction, linear_logprobs, sequence_sums

    cu, counts = _seqs(inp, shape)
    h, w, t = inp["hidden"], inp["weight"], inp["targets"]
    if chunked_torch:  # the chunked Function with torch reductions (CPU: no Triton)
        rows = max(1, (256 << 20) // (w.shape[0] * 4))
        return lambda: _dpo(sequence_sums(LinearLogprobsFunction.apply(h, w, t, -100, 0, None, rows, False, h.dtype),
                                          cu), counts)  # fmt: skip
    return lambda: _dpo(linear_logprobs(h, w, t, cu_seqlens=cu, backend="triton"), counts)


def _eager(inp, shape, compile_ref=False):
    from llama3hp.kernels.logprobs import linear_logprobs_ref

    cu, counts = _seqs(inp, shape)
    fn = compiled(linear_logprobs_ref, inp["hidden"].device) if compile_ref else linear_logprobs_ref
    return lambda: _dpo(fn(inp["hidden"], inp["weight"], inp["targets"], cu_seqlens=cu), counts)


def _liger(inp, shape, compile_liger=True):
    loss_cls = import_or_unavailable("liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss")
    loss_fn = loss_cls(
        beta=0.1, alpha=0.2, compute_nll_loss=True, use_ref_model=False, compiled=compile_liger
    )
    t = shape["seq"]
    h = inp["hidden"].view(-1, t, inp["hidden"].shape[-1])
    y = inp["targets"].view(-1, t)
    return lambda: loss_fn(inp["weight"], h, y)[0]


def flops(shape: dict, mode: str, dtype: torch.dtype) -> float:
    gemm = 2.0 * shape["tokens"] * shape["hidden"] * shape["vocab"]
    return {"fwd": gemm, "bwd": 2 * gemm, "fwd+bwd": 3 * gemm}[mode]


BENCH = Benchmark(
    name="logprobs",
    shapes=[
        {"tokens": 8192, "hidden": 4096, "vocab": 128256, "seq": SEQ},
        {"tokens": 32768, "hidden": 4096, "vocab": 128256, "seq": SEQ},
    ],
    quick_shapes=[{"tokens": 64, "hidden": 32, "vocab": 500, "seq": 16}],
    make_inputs=make_inputs,
    providers={
        "llama3hp": _ours,
        "torch": _eager,
        "torch.compile": lambda inp, shape: _eager(inp, shape, compile_ref=True),
        "liger": _liger,
    },
    work=flops,
    metric="TFLOP/s",
    memory=True,
    notes=[
        "DPO loss from hidden states (B chosen + B rejected sequences of 1,024 tokens, first quarter unscored).",
        "Targets: peak memory <= 25% of the materialised path (torch), >= 1.0x Liger (fwd+bwd), "
        ">= 4x the longest sequence that fits.",
    ],
)

# ------------------------------------------------------------------------------------------ CPU run

CPU_SHAPES = [{"tokens": 1024, "hidden": 256, "vocab": 128256, "seq": 512},
              {"tokens": 4096, "hidden": 256, "vocab": 128256, "seq": 512}]  # fmt: skip
CPU_PROVIDERS = {
    "inputs only": None,
    "llama3hp (chunked)": lambda inp, shape: _ours(inp, shape, chunked_torch=True),
    "torch (materialised)": _eager,
    "liger (eager)": lambda inp, shape: _liger(inp, shape, compile_liger=False),
}


def _child(provider: str, shape: dict, reps: int, out: str) -> None:
    """One provider in this process: its median fwd+bwd seconds, written to `out` as JSON."""
    torch.manual_seed(0)
    inp = make_inputs(shape, torch.device("cpu"), torch.float32)
    build = CPU_PROVIDERS[provider]
    times, loss = [], None
    if build is not None:
        fn = build(inp, shape)
        for _ in range(reps):
            inp["hidden"].grad = inp["weight"].grad = None
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            times.append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps({"s": sorted(times)[len(times) // 2] if times else 0.0,
                                     "loss": None if loss is None else loss.item()}))  # fmt: skip


def run_cpu(out_dir: Path | None, reps: int) -> Path:
    from benchmarks.workload import environment, header, write_results

    rows = []
    for shape in CPU_SHAPES:
        for provider in CPU_PROVIDERS:
            result = Path(f"/tmp/llama3hp-bench-logprobs-{os.getpid()}.json")
            cmd = [sys.executable, "-m", "benchmarks.bench_logprobs", "--child", provider, json.dumps(shape),
                   str(reps), str(result)]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                err = proc.stderr.read().decode() if proc.stderr else ""
                rows.append({"provider": provider, **shape, "error": err.strip()[-300:]})
                continue
            got = json.loads(result.read_text())
            result.unlink()
            rows.append({"provider": provider, **shape, "fwd_bwd_s": got["s"], "loss": got["loss"],
                         "peak_rss_mib": usage.ru_maxrss / 1024})  # fmt: skip
            print(rows[-1], flush=True)
    env = environment(["torch", "liger-kernel"])
    rows = [{"bench": "logprobs_cpu", **r, **env} for r in rows]
    lines = header(
        "DPO loss from hidden states on CPU: chunked log-probabilities vs materialised vs Liger", env
    )
    lines += ["| tokens | provider | fwd+bwd s | peak RSS above inputs MiB | vs materialised | loss |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for shape in CPU_SHAPES:
        mine = [r for r in rows if r["tokens"] == shape["tokens"] and "error" not in r]
        base = next((r["peak_rss_mib"] for r in mine if r["provider"] == "inputs only"), 0.0)
        mat = next((r["peak_rss_mib"] - base for r in mine if r["provider"].startswith("torch")), None)
        for r in mine:
            if r["provider"] == "inputs only":
                continue
            extra = r["peak_rss_mib"] - base
            share = f"{100 * extra / mat:.0f}%" if mat else ""
            lines.append(f"| {shape['tokens']:,} | {r['provider']} | {r['fwd_bwd_s']:.2f} | {extra:,.0f} | {share} | "
                         f"{r['loss']:.4f} |")  # fmt: skip
    lines += ["", f"D = 256, V = 128,256, sequences of 512 tokens, fp32; median of {reps} runs; 2 cores shared "
              "with other jobs, so times are indicative. Liger runs its chunked loss in eager mode (no "
              "torch.compile on CPU)."]  # fmt: skip
    out = out_dir or Path(__file__).resolve().parent / "results" / "cpu"
    return write_results("logprobs", rows, "\n".join(lines) + "\n", out)


def max_fit(out_dir: Path | None) -> Path:
    """GPU: for each provider the most tokens (doubling from 8K, sequences of SEQ) whose fwd+bwd runs
    without running out of memory: the issue's ">= 4x the longest sequence that fits"."""
    from benchmarks.harness import Unavailable, device_slug
    from benchmarks.workload import environment, write_results

    dev = torch.device("cuda")
    rows = []
    for name, build in (("llama3hp", _ours), ("torch", _eager), ("liger", _liger)):
        best, tokens = 0, 8192
        while tokens <= 1 << 22:
            shape = {"tokens": tokens, "hidden": 4096, "vocab": 128256, "seq": SEQ}
            try:
                inp = make_inputs(shape, dev, torch.bfloat16)
                build(inp, shape)().backward()
                torch.cuda.synchronize()
                best, tokens = tokens, tokens * 2
            except Unavailable:
                break
            except torch.OutOfMemoryError:
                break
            finally:
                inp = None  # noqa: F841 - free before the next size
                torch.cuda.empty_cache()
        rows.append({"provider": name, "max_tokens": best, "device": torch.cuda.get_device_name(dev)})
        print(rows[-1], flush=True)
    env = environment(["torch", "liger-kernel"])
    lines = ["# The most tokens whose DPO loss fwd+bwd fits (hidden 4,096, vocab 128,256, bf16)", "",
             f"{env['date']}, {rows[0]['device']}; command `{env['command']}`", "",
             "| provider | most tokens | vs torch |", "| --- | --- | --- |"]  # fmt: skip
    base = next(r["max_tokens"] for r in rows if r["provider"] == "torch") or 1
    lines += [f"| {r['provider']} | {r['max_tokens']:,} | {r['max_tokens'] / base:.1f}x |" for r in rows]
    out = out_dir or Path(__file__).resolve().parent / "results" / device_slug(dev)
    return write_results("logprobs_fit", [{**r, **env} for r in rows], "\n".join(lines) + "\n", out)


def main(argv: list[str] | None = None):
    from benchmarks.harness import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _, provider, shape, reps, out = argv
        return _child(provider, json.loads(shape), int(reps), out)
    i = argv.index("--out") if "--out" in argv else None
    out = Path(argv[i + 1]) if i is not None else None
    if "--cpu" in argv:
        return run_cpu(out, reps=3)
    if "--max-fit" in argv:
        return max_fit(out)
    return run_main(BENCH, argv)


if __name__ == "__main__":
    main()
