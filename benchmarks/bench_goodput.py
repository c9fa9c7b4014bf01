"""Goodput under injected failures: a chaos run against the same run uninterrupted (CPU, gloo, torchrun).

    python -m benchmarks.bench_goodput            # 4 gloo ranks, 300 steps, a failure about every 100 steps
    python -m benchmarks.bench_goodput --quick    # CI-sized: 1 rank, 8 steps, one kill, seconds

Both runs are real torchrun jobs as `launch/torchrun.sh` starts them (`--max-restarts`,
`training.resume=auto`), training a small Llama on random tokens with a checkpoint every
`--interval` steps. The chaos run adds `fault.every=--every` with `--kinds` (kill: SIGKILL a rank;
hang: SIGSTOP a rank, found by the other ranks' watchdogs): the i-th fault of the seeded schedule
fires in launch attempt i, so every fault is met once and torchrun restarts the job each time.

Figures (one row per run):
- `goodput` = productive step time / wall time of the whole torchrun command, where productive step
  time is the sum of the `step_time_s` of the steps that count (one metrics row per step survives
  resumes); start-up, checkpoint blocking, redone steps and restarts are the rest;
- `steps_redone_per_failure`: for fault i at step s_i, attempt i+1 resumed at r_i: s_i - r_i steps
  are computed again (the interrupted step included); the target is at most one checkpoint interval;
- `restart_s_per_failure`: (chaos wall - baseline wall - redone steps x median step time) / failures,
  the time from a failure to training again (detection, torchrun's restart, start-up, loading);
- `loss_bit_identical`: the chaos run's per-step losses equal the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import header, parse_args, publish

ROOT = Path(__file__).resolve().parent.parent

# A small Llama (dim 512, 6 layers, 8K vocabulary, 29M parameters) on random tokens: 8 rows of 256
# tokens per step take ~2.6 s over 4 gloo ranks on 2 shared cores.
MODEL = [
    "model.dim=512", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=2", "model.vocab_size=8192",
    "model.multiple_of=64", "model.max_seq_len=256", "model.rope_scaling=false", "training.seq_len=256",
    "training.micro_batch_rows=2", "training.global_batch_rows=8", "training.warmup_steps=10",
    "training.lr=1e-3", "metrics.progress=false", "metrics.plot=false", "metrics.gpu_telemetry=false",
    "metrics.peak_flops=1e12",
]  # fmt: skip


def write_dataset(folder: Path, vocab: int = 8192) -> str:
    import numpy as np

    from llama3hp.data import write_token_dataset
    from llama3hp.data.tokenizer import tokenizer_file_sha256

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=int(rng.integers(20, 600))) for _ in range(4000)]
    write_token_dataset(docs, folder, tokenizer_sha256=tokenizer_file_sha256(), vocab_size=vocab)
    return str(folder)


def torchrun(ranks: int, overrides: list[str], max_restarts: int, log: Path) -> float:
    """Wall seconds of one torchrun job (as launch/torchrun.sh starts it); raises if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={ranks}",
        f"--max-restarts={max_restarts}", "-m", "llama3hp.cli", "train", "--config", "tiny",
        "training.resume=auto", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun exited {proc.returncode}; last lines of {log}:\n{log.read_text()[-3000:]}"
        )
    return wall


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def summarize(name: str, run_dir: Path, wall: float, interval: int, ref: list[dict] | None) -> dict[str, Any]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    faults = read_jsonl(run_dir / "faults.jsonl")
    resumes = [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "resume"]
    productive = sum(r["step_time_s"] for r in rows)
    median_step = statistics.median(r["step_time_s"] for r in rows)
    by_attempt = {int(e["message"].rsplit("attempt ", 1)[1].rstrip(")")): e["step"] for e in resumes}
    redone = [f["step"] - by_attempt.get(f["attempt"] + 1, 0) for f in faults]
    out: dict[str, Any] = {
        "run": name,
        "steps": len(rows),
        "steps_unique": [r["step"] for r in rows] == list(range(1, len(rows) + 1)),
        "interval": interval,
        "failures": len(faults),
        "fault_kinds": [f["kind"] for f in faults],
        "restarts": len(resumes),
        "wall_s": round(wall, 2),
        "productive_s": round(productive, 2),
        "median_step_s": round(median_step, 4),
        "goodput": round(productive / wall, 4),
        "steps_redone_per_failure": redone,
        "max_redone_le_interval": all(r <= interval for r in redone),
        "checkpoint_block_s": round(sum(r.get("checkpoint_block_s", 0.0) for r in rows), 3),
    }
    if ref is not None:
        out["loss_bit_identical"] = [r["loss"] for r in rows] == [r["loss"] for r in ref]
    return out


def markdown(rows: list[dict], env: dict) -> str:
    lines = header("Goodput under injected failures (CPU, gloo, torchrun)", env)
    lines += [
        "| run | ranks | steps | failures (kinds) | restarts | wall s | productive s | goodput | steps redone / failure "
        "(interval) | restart s / failure | loss bit-identical |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        kinds = ", ".join(r["fault_kinds"]) or "-"
        restart = f"{r['restart_s_per_failure']:.1f}" if "restart_s_per_failure" in r else "-"
        lines.append(
            f"| {r['run']} | {r['ranks']} | {r['steps']} | {r['failures']} ({kinds}) | {r['restarts']} | {r['wall_s']:.1f} "
            f"| {r['productive_s']:.1f} | {100 * r['goodput']:.1f}% | {r['steps_redone_per_failure'] or '-'} "
            f"({r['interval']}) | {restart} | {r.get('loss_bit_identical', '-')} |"
        )
    lines += [
        "",
        "goodput = productive step time / wall time of the whole torchrun command (start-up included); "
        "restart s / failure = (chaos wall - baseline wall - redone steps x median step) / failures.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--every", type=int, default=None, help="a failure about every N steps")
    ap.add_argument("--interval", type=int, default=None, help="checkpoint interval")
    ap.add_argument("--ranks", type=int, default=None)
    ap.add_argument("--kinds", default="kill,hang")
    ap.add_argument(
        "--seed", type=int, default=1, help="fault schedule seed (1: kill, hang, hang in 300 steps)"
    )
    own, rest = ap.parse_known_args(argv)
    args = parse_args(rest, __doc__, reps=1)
    quick = args.quick
    steps = own.steps or (8 if quick else 300)
    every = own.every or (5 if quick else 100)
    interval = own.interval or (2 if quick else 10)
    ranks = own.ranks or (1 if quick else 4)
    kinds = ["kill"] if quick else own.kinds.split(",")
    work = Path(tempfile.mkdtemp(prefix="goodput-"))
    data = write_dataset(work / "data")
    quick_model = [
        "model.dim=64", "model.n_heads=4", "model.n_layers=2", "training.seq_len=64", "model.max_seq_len=64",
        "training.warmup_steps=2",
    ]  # fmt: skip
    model = [*MODEL, *quick_model] if quick else MODEL
    common = [
        *model, f'data.datasets=["{data}"]', f"training.steps={steps}", "parallel.dp=-1",
        "checkpoint.enabled=true", f"checkpoint.interval={interval}", "checkpoint.keep=2", "checkpoint.async=true",
        "watchdog.hang_factor=5", "watchdog.hang_floor_s=5", "watchdog.heartbeat_s=1",
        "watchdog.phase_timeout_s=60",
    ]  # fmt: skip
    chaos = [f"fault.every={every}", f"fault.kinds={json.dumps(kinds)}", f"fault.seed={own.seed}"]
    from llama3hp.train.faults import FaultConfig, schedule

    planned = schedule(FaultConfig(every=every, kinds=kinds, seed=own.seed), ranks, steps)
    print(f"baseline: {ranks} rank(s), {steps} steps, checkpoint every {interval}", flush=True)
    wall0 = torchrun(ranks, [*common, f"run_dir={work}/baseline"], 0, work / "baseline.log")
    base = summarize("uninterrupted", work / "baseline", wall0, interval, None)
    ref = read_jsonl(work / "baseline" / "metrics.jsonl")
    print(f"chaos: {len(planned)} faults planned: {planned}", flush=True)
    wall1 = torchrun(ranks, [*common, *chaos, f"run_dir={work}/chaos"], len(planned) + 1, work / "chaos.log")
    run = summarize(f"a failure every ~{every} steps", work / "chaos", wall1, interval, ref)
    if run["failures"]:
        redone_s = sum(run["steps_redone_per_failure"]) * run["median_step_s"]
        run["restart_s_per_failure"] = round((wall1 - wall0 - redone_s) / run["failures"], 2)
        run["goodput_vs_uninterrupted"] = round(wall0 / wall1, 4)
    rows = [{"ranks": ranks, **base}, {"ranks": ranks, **run}]
    return publish("goodput", rows, [], markdown, args)


if __name__ == "__main__":
    main()
