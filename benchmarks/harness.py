"""The one harness behind every kernel microbenchmark (`benchmarks/bench_*.py`).

A benchmark module describes itself with a `Benchmark` and hands it to `main`:

    BENCH = Benchmark(
        name="rmsnorm",                                  # results file name: <name>.json / .md
        shapes=[{"tokens": 16384, "dim": 4096}],         # GPU shapes (one dict each)
        quick_shapes=[{"tokens": 64, "dim": 256}],       # CPU --quick shapes (interpreter-sized)
        make_inputs=make_inputs,                         # (shape, device, dtype) -> dict of tensors
        providers={"llama3hp": fn, "torch": fn, ...},    # name -> (inputs, shape) -> closure
        work=lambda shape, mode, dtype: bytes_moved,     # bytes (metric="GB/s") or FLOPs ("TFLOP/s")
        metric="GB/s",
    )
    def main(argv=None): return run_main(BENCH, argv)

A provider builder gets fresh inputs and returns a zero-argument closure running the forward,
which returns the output tensor or a tuple of them; it raises `Unavailable` when its library is
not installed (the provider is skipped with a note). The harness derives the three modes from
it: "fwd" times the closure; "bwd" runs it once and times `autograd.backward` on random output
gradients (retain_graph); "fwd+bwd" times both. Input gradients are reset to None between runs.

Timing: on CUDA the median of `triton.testing.do_bench` after one untimed warm-up call (which
compiles and autotunes); with --quick on CPU the median of a few `time.perf_counter` runs.
Derived numbers: GB/s or TFLOP/s from `work`, their fraction of the device peak measured in the
same run (a 1 GiB device-to-device copy; an 8192^3 bf16 matmul on random data), and on CUDA the
peak memory of each provider (max_memory_allocated minus what was allocated before the call).

Agreement: before timing a GPU shape, every provider runs once on the same inputs and output
gradients as llama3hp (`agreement`), and its rows carry `rel_err_vs_ours` (outputs and input
gradients), listed under the table: a peer that computes something else is not a fair comparison.

Output: one JSON row per (shape, provider, mode) carrying GPU name, torch/triton versions, date
and command line, plus a markdown table with one line per (shape, mode) whose columns hold the
ratios the targets are stated in (speedup of llama3hp over each peer, memory relative to eager).
GPU runs write `benchmarks/results/<device-slug>/<name>.{json,md}`; quick runs write to --out or
a fresh temporary directory, never into results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # Kernels run under the Triton interpreter on CPU; the flag must be set before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
OURS = "llama3hp"
EAGER = "torch"
QUICK_PROVIDERS = (OURS, EAGER)  # the ones that run on CPU in seconds


class Unavailable(Exception):
    """Raised by a provider builder whose library (Liger, torch.compile backend...) is missing."""


@dataclass
class Benchmark:
    """A kernel microbenchmark: shapes x providers x modes (see module docstring)."""

    name: str
    shapes: list[dict]  # full-size shapes for the GPU
    quick_shapes: list[dict]  # interpreter-sized shapes for --quick on CPU
    make_inputs: Callable[[dict, torch.device, torch.dtype], dict[str, torch.Tensor]]
    providers: dict[str, Callable[[dict[str, torch.Tensor], dict], Callable[[], Any]]]
    work: Callable[[dict, str, torch.dtype], float]  # bytes moved or FLOPs for (shape, mode, dtype)
    metric: str = "GB/s"  # "GB/s" (compared with copy bandwidth) or "TFLOP/s" (with bf16 matmul)
    dtype: torch.dtype = torch.bfloat16  # GPU dtype; --quick uses float32
    modes: tuple[str, ...] = MODES
    peers: tuple[str, ...] = ("torch.compile", "liger")  # speedup columns in the markdown table
    memory: bool = False  # add peak-memory columns (ours vs eager) to the markdown table
    notes: list[str] = field(default_factory=list)
    # markdown appended under the table, computed from this run's rows (e.g. the targets)
    summary: Callable[[list[dict]], str] | None = None


def import_or_unavailable(module: str, attr: str) -> Any:
    """`from module import attr`, raising Unavailable (the provider is skipped) when it cannot."""
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{module}.{attr} not importable ({type(e).__name__})") from None


_compile_on_cpu = False


@contextlib.contextmanager
def compile_on_cpu():
    """Lets `compiled` build torch.compile providers on CPU too (the agreement tests: compiling takes
    seconds per graph there, too slow for --quick timing runs)."""
    global _compile_on_cpu
    before, _compile_on_cpu = _compile_on_cpu, True
    try:
        yield
    finally:
        _compile_on_cpu = before


def compiled(fn: Callable, device: torch.device) -> Callable:
    """torch.compile(fn) on CUDA; on CPU skipped as unavailable unless inside `compile_on_cpu()`."""
    if device.type != "cuda" and not _compile_on_cpu:
        raise Unavailable("torch.compile is measured on GPU runs only")
    return torch.compile(fn, dynamic=False)


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any], device: torch.device, grad_to_none: list[torch.Tensor] | None = None
) -> float:
    """Median milliseconds of fn(); fn is called once first, untimed (compilation, autotuning)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        return float(
            triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        )
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s) measured on this device now."""
    n_bytes, mm = (8 * 2**20, 256) if quick else (2**30, 8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    a = torch.randn(mm, mm, device=device, dtype=dtype)
    b = torch.randn(mm, mm, device=device, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, device)
    return {"copy_gbps": 2 * n_bytes / copy_ms / 1e6, "matmul_tflops": 2 * mm**3 / mm_ms / 1e9}


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    outs = out if isinstance(out, tuple | list) else (out,)
    return tuple(o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)


def build_mode(forward: Callable[[], Any], mode: str) -> Callable[[], Any]:
    """The timed closure for one mode, from a provider's forward closure."""
    if mode == "fwd":
        return forward
    if mode == "fwd+bwd":
        grads: list[torch.Tensor] = []

        def step():
            outs = _as_tuple(forward())
            if not grads:  # random output gradients, drawn once outside later timed calls
                grads.extend(torch.randn_like(o) for o in outs)
            torch.autograd.backward(outs, grads)

        return step
    outs = _as_tuple(forward())
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.backward(outs, grads, retain_graph=True)


def run_once(
    bench: Benchmark, provider: str, shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor] | str]:
    """One forward and backward of `provider` on inputs drawn from `seed` and output gradients drawn
    from seed + 1, so every provider sees the same numbers: (outputs, gradients of the inputs that
    require them), detached; the gradients are the backward's error message where it raised."""
    torch.manual_seed(seed)
    inputs = bench.make_inputs(shape, device, dtype)
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    try:
        outs = _as_tuple(bench.providers[provider](inputs, shape)())
    except Unavailable:
        raise
    except Exception as e:
        if not leaves:
            raise
        # A forward that refuses inputs requiring grad (FlexAttention on CPU) is checked without them.
        for t in leaves:
            t.requires_grad_(False)
        out = bench.providers[provider](inputs, shape)()
        outs = out if isinstance(out, tuple | list) else (out,)
        return [o.detach() for o in outs], f"{type(e).__name__}: {e}".splitlines()[0][:200]
    gen = torch.Generator(device).manual_seed(seed + 1)
    grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
    detached = [o.detach() for o in outs]
    try:
        torch.autograd.backward(outs, grads)
    except Exception as e:  # noqa: BLE001 - reported, like the forward above
        return detached, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return detached, [t.grad for t in leaves]


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest ||got - want|| / ||want|| over matching tensors (inf where shapes or counts differ)."""
    if len(got) != len(want) or any(g is None or g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    err = 0.0
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        err = max(err, float((g - w).norm() / w.norm().clamp_min(1e-30)))
    return err


def agreement(
    bench: Benchmark, shape: dict, device: torch.device, dtype: torch.dtype, providers: list[str]
) -> dict[str, dict[str, Any]]:
    """How far each provider's outputs and input gradients are from llama3hp's on the same inputs:
    {provider: {"out": rel. error, "grads": rel. error or the backward's error message}}; providers
    that are unavailable or fail their forward are left out (the timing rows say why)."""
    ref_out, ref_grads = run_once(bench, OURS, shape, device, dtype)
    result = {}
    for provider in providers:
        if provider == OURS:
            continue
        try:
            out, grads = run_once(bench, provider, shape, device, dtype)
        except Exception:  # noqa: BLE001 - Unavailable or broken: the timing rows report it
            continue
        result[provider] = {
            "out": rel_error(out, ref_out),
            "grads": grads
            if isinstance(grads, str) or isinstance(ref_grads, str)
            else rel_error(grads, ref_grads),
        }
    return result


def _peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def environment(device: torch.device, quick: bool) -> dict[str, Any]:
    return {
        "device": device_slug(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "quick": quick,
    }


def run_benchmark(
    bench: Benchmark,
    *,
    quick: bool,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, float]]:
    """Runs every (shape, provider, mode); returns (rows, measured peaks)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    dtype = bench.dtype if device.type == "cuda" else torch.float32
    names = providers or (list(QUICK_PROVIDERS) if quick else list(bench.providers))
    unknown = [p for p in names if p not in bench.providers]
    if unknown:
        raise ValueError(
            f"unknown providers {unknown} for {bench.name}: choose from {', '.join(bench.providers)}"
        )
    peaks = measure_peaks(device, quick)
    env = environment(device, quick)
    rows = []
    for shape in bench.quick_shapes if quick else bench.shapes:
        agree = {}
        if OURS in bench.providers and not quick:  # peers must compute what we compute to be compared
            try:
                agree = agreement(bench, shape, device, dtype, names)
            except Exception as e:  # noqa: BLE001 - our own provider failed: its timing rows say how
                log(f"{bench.name} {shape_str(shape)}: no agreement check ({type(e).__name__}: {e})")
        for provider in names:
            for mode in modes or bench.modes:
                row = {"bench": bench.name, "provider": provider, "mode": mode, "shape": shape}
                row |= {"shape_str": shape_str(shape), "dtype": str(dtype).removeprefix("torch."), **env}
                try:
                    row |= _measure(bench, provider, shape, mode, device, dtype, peaks)
                except Unavailable as e:
                    row["skipped"] = str(e)
                except Exception as e:  # noqa: BLE001 - a failing peer must not abort the others
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                if provider in agree:
                    row["rel_err_vs_ours"] = agree[provider]
                rows.append(row)
                log(row_line(row))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, peaks


def _measure(bench, provider, shape, mode, device, dtype, peaks) -> dict[str, Any]:
    inputs = bench.make_inputs(shape, device, dtype)
    forward = bench.providers[provider](inputs, shape)
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    fn = build_mode(forward, mode)
    ms = time_ms(fn, device, grad_to_none=leaves)
    for t in leaves:
        t.grad = None
    mem = _peak_memory_mb(fn, device)
    work = bench.work(shape, mode, dtype)
    if bench.metric == "GB/s":
        value, peak = work / ms / 1e6, peaks["copy_gbps"]
    else:
        value, peak = work / ms / 1e9, peaks["matmul_tflops"]
    return {
        "ms": ms,
        "metric": bench.metric,
        "value": value,
        "frac_of_peak": value / peak,
        "peak_mem_mb": mem,
        **peaks,
    }


def row_line(row: dict) -> str:
    head = f"{row['bench']:>14} {row['provider']:>14} {row['mode']:>8} {row['shape_str']:<40}"
    if "ms" in row:
        return f"{head} {row['ms']:9.3f} ms {row['value']:9.4g} {row['metric']} ({100 * row['frac_of_peak']:.0f}% of peak)"
    return f"{head} {row.get('skipped') or row.get('error')}"


def markdown_table(bench: Benchmark, rows: list[dict], peaks: dict[str, float]) -> str:
    """One line per (shape, mode): our time and rate, % of the measured peak, and ratios to each peer."""
    timed = {(r["shape_str"], r["mode"], r["provider"]): r for r in rows if "ms" in r}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    others = [p for p in providers if p != OURS]
    peak_name = "copy BW" if bench.metric == "GB/s" else "matmul peak"
    cols = ["shape", "mode", f"{OURS} ms", f"{OURS} {bench.metric}", f"% of {peak_name}"]
    cols += [f"{p} ms" for p in others] + [f"speedup vs {p}" for p in others]
    if bench.memory:
        cols += [f"{OURS} peak MB", f"{EAGER} peak MB", f"{OURS} mem / {EAGER}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    keys = list(dict.fromkeys((r["shape_str"], r["mode"]) for r in rows))
    for shape, mode in keys:
        ours = timed.get((shape, mode, OURS))
        cells = [shape, mode]
        cells += (
            [f"{ours['ms']:.3f}", f"{ours['value']:.4g}", f"{100 * ours['frac_of_peak']:.0f}%"]
            if ours
            else ["-"] * 3
        )
        peer_rows = [timed.get((shape, mode, p)) for p in others]
        cells += [f"{r['ms']:.3f}" if r else "-" for r in peer_rows]
        cells += [f"{r['ms'] / ours['ms']:.2f}x" if r and ours else "-" for r in peer_rows]
        if bench.memory:
            eager = timed.get((shape, mode, EAGER))
            mem_o = ours and ours.get("peak_mem_mb")
            mem_e = eager and eager.get("peak_mem_mb")
            cells += [
                f"{mem_o:.0f}" if mem_o is not None else "-",
                f"{mem_e:.0f}" if mem_e is not None else "-",
            ]
            cells += [f"{100 * mem_o / mem_e:.0f}%" if mem_o is not None and mem_e else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    env = next(iter(rows), {})
    header = [
        f"# {bench.name}",
        "",
        f"Device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}; "
        f"{env.get('date')}; dtype {env.get('dtype')}.",
        f"Measured in this run: copy {peaks['copy_gbps']:.0f} GB/s, matmul {peaks['matmul_tflops']:.1f} TFLOP/s.",
        f"Command: `{env.get('command')}`",
        "",
    ]
    notes = [f"- {r['provider']} ({r['shape_str']}, {r['mode']}): {r.get('skipped') or r.get('error')}"
             for r in rows if "ms" not in r]  # fmt: skip
    notes = ["", "Not measured:", *dict.fromkeys(notes)] if notes else []
    extra = ["", *[f"- {n}" for n in bench.notes]] if bench.notes else []
    return "\n".join(header + lines + notes + agreement_lines(rows) + extra) + "\n"


def agreement_lines(rows: list[dict]) -> list[str]:
    """Markdown for the agreement check: each peer's relative error against llama3hp, per shape."""
    fmt = lambda e: e if isinstance(e, str) else f"{e:.1e}"
    seen = {(r["shape_str"], r["provider"]): r["rel_err_vs_ours"] for r in rows if "rel_err_vs_ours" in r}
    if not seen:
        return []
    lines = ["", f"Agreement with {OURS} (same inputs and output gradients; relative error):", ""]
    lines += ["| shape | provider | outputs | input gradients |", "|---|---|---|---|"]
    lines += [f"| {shape} | {p} | {fmt(e['out'])} | {fmt(e['grads'])} |" for (shape, p), e in seen.items()]
    return lines


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(
    bench: Benchmark, rows: list[dict], peaks: dict[str, float], out_dir: Path, *, extra_md: str = ""
) -> tuple[Path, Path]:
    """Writes <out_dir>/<name>.json (rows) and <name>.md (the table, then extra_md, e.g. a targets
    table); each file appears whole or not at all."""
    json_path, md_path = out_dir / f"{bench.name}.json", out_dir / f"{bench.name}.md"
    _write_atomic(json_path, json.dumps(rows, indent=1, default=str) + "\n")
    md = markdown_table(bench, rows, peaks)
    _write_atomic(md_path, md + ("\n" + extra_md if extra_md else ""))
    return json_path, md_path


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (Triton interpreter), in seconds")
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default: results/<device> on GPU)"
    )
    p.add_argument("--providers", nargs="+", default=None, help="subset of providers to run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="subset of modes to run")
    return p


def run_main(bench: Benchmark, argv: list[str] | None = None) -> Path:
    """Command-line entry of a benchmark module; returns the directory the results went to."""
    args = build_parser(f"{bench.name} kernel microbenchmark").parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit(f"{bench.name}: full-size benchmarks need a CUDA GPU; use --quick on CPU")
    rows, peaks = run_benchmark(bench, quick=args.quick, providers=args.providers, modes=args.modes)
    if args.out is not None:
        out_dir = args.out
    elif args.quick:
        out_dir = Path(tempfile.mkdtemp(prefix="llama3hp-bench-"))
    else:
        out_dir = RESULTS_DIR / device_slug(torch.device("cuda"))
    extra = bench.summary(rows) if bench.summary else ""
    json_path, md_path = write_results(bench, rows, peaks, out_dir, extra_md=extra)
    print(f"wrote {json_path} and {md_path}")
    return out_dir
