"""Runs every `benchmarks/bench_*.py` module in one process: python -m benchmarks.run_all [--quick] [--out DIR].

Kernel benchmarks first, then the CPU workload ones (curation, the data path, rejection sampling,
shared-prompt packing, goodput under failures, checkpoint blocking).

Arguments are passed through to each benchmark's `main`. A failing benchmark is reported and the
others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

# CPU workload benchmarks: whole pipelines against peers (datatrove, megatron-core, raw tiktoken, our
# own engine with a feature off),
# with rows and tables of their own (benchmarks/workload.py) rather than the kernel harness's.
WORKLOADS = (
    "benchmarks.bench_curate",
    "benchmarks.bench_data_path",
    "benchmarks.bench_rejection",
    "benchmarks.bench_shared_prompt",
    "benchmarks.bench_goodput",
    "benchmarks.bench_checkpoint",
)


def discover() -> list[str]:
    """Module names of the kernel benchmarks next to this file, sorted."""
    here = Path(__file__).resolve().parent
    return sorted(
        f"benchmarks.{p.stem}" for p in here.glob("bench_*.py") if f"benchmarks.{p.stem}" not in WORKLOADS
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these benchmarks (e.g. rmsnorm rope)"
    )
    parser.add_argument("--skip", nargs="+", default=[], help="leave these benchmarks out (e.g. serve)")
    args, passthrough = parser.parse_known_args(argv)
    failed = []
    for name in discover() + list(WORKLOADS):
        short = name.removeprefix("benchmarks.bench_")
        if (args.only and short not in args.only) or short in args.skip:
            continue
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(name).main(passthrough)
        except Exception:  # noqa: BLE001 - keep going, report at the end
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
