"""Shared plumbing of the CPU workload benchmarks (`bench_curate`, `bench_data_path`).

They time whole pipelines and index builders against peers (datatrove, megatron-core, raw
tiktoken) rather than kernels, so they do not use the kernel harness (and never import torch):

- `paired(ours, peer, reps)`: the two in turn, A B A B ..., so drift on a shared machine hits both;
  returns the medians and the median of the per-pair ratios peer/ours (above 1: we are faster).
- `run_process(cmd)`: a whole process, start-up included: wall and CPU seconds (user + sys, from
  the kernel's accounting of that child) and peak RSS.
- `environment()`: date, versions, CPU count and the command line, carried by every row.
- `parse_args(argv, doc, reps)` / `publish(name, rows, peers, markdown, args)`: the shared
  command line (--quick, --out, --reps) and the ending: environment in every row, the table
  printed, `<name>.json` and `<name>.md` written (each to a temporary name, then renamed) under
  --out, `results/cpu/` for a full run, or a temporary folder for --quick.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_CPU = Path(__file__).resolve().parent / "results" / "cpu"


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(peers: Sequence[str]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("llama3hp", "numpy", "tiktoken", *peers)},
        "command": " ".join(["python -m benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]]),
    }


def header(title: str, env: dict[str, Any]) -> list[str]:
    """The first lines of a results table: title, then machine, versions and command."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return [
        f"# {title}",
        "",
        f"{env['date']}, {env['cpu']} ({env['cores']} cores), Python {env['python']}; {versions}; "
        f"command `{env['command']}`",
        "",
    ]


def paired(ours: Callable[[], Any], peer: Callable[[], Any], reps: int) -> dict[str, float]:
    """Median seconds of each and the median per-pair speedup (peer time / our time).

    Pairs alternate who goes first (A B, B A, ...), so neither always runs on a cache or an
    allocator the other just warmed.
    """
    a, b = [], []
    for i in range(reps):
        order = ((ours, a), (peer, b)) if i % 2 == 0 else ((peer, b), (ours, a))
        for fn, acc in order:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return {
        "ours_s": statistics.median(a),
        "peer_s": statistics.median(b),
        "speedup": statistics.median(y / x for x, y in zip(a, b)),
    }


def best_of(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `reps` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_process(cmd: Sequence[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall, CPU (user + sys) seconds and peak RSS MiB of one whole process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[-500:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def write_results(name: str, rows: list[dict], table: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (out / f"{name}.json", json.dumps(rows, indent=1) + "\n"),
        (out / f"{name}.md", table),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return out


def parse_args(argv: list[str] | None, doc: str, reps: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized inputs, one repetition")
    ap.add_argument(
        "--out", default=None, help="results folder (default: benchmarks/results/cpu, or a temp dir)"
    )
    ap.add_argument("--reps", type=int, default=None, help=f"paired repetitions (default {reps}, quick 1)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else reps)
    return args


def publish(
    name: str, rows: list[dict], peers: Sequence[str], markdown: Callable[[list[dict], dict], str], args
) -> Path:
    env = environment(peers)
    rows = [{"bench": name, **r, **env} for r in rows]
    table = markdown(rows, env)
    print(table)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else RESULTS_CPU)
    return write_results(name, rows, table, out)
