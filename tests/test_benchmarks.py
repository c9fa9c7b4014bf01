"""The benchmark harness end to end: `run_all --quick` on CPU writes well-formed JSON rows and tables."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import harness, run_all

REQUIRED = {"bench", "provider", "mode", "shape", "dtype", "device", "torch", "triton", "date", "command"}


# bench_serve times whole generation runs against HF transformers (a minute on CPU): its --quick run
# is tested on its own (tests/inference/test_bench_serve.py).
STANDALONE = ["serve"]


def test_run_all_quick_writes_rows_for_every_benchmark(tmp_path):
    assert run_all.main(["--quick", "--out", str(tmp_path), "--skip", *STANDALONE]) == 0
    names = [m.removeprefix("benchmarks.bench_") for m in run_all.discover()]
    assert {"rmsnorm", "rope", "swiglu", "cross_entropy", "paged_attention"} <= set(names)
    for name in (n for n in names if n not in STANDALONE):
        modes = set(importlib.import_module(f"benchmarks.bench_{name}").BENCH.modes)
        rows = json.loads((tmp_path / f"{name}.json").read_text())
        assert rows, name
        for row in rows:
            assert REQUIRED <= row.keys(), (name, REQUIRED - row.keys())
            assert "error" not in row, (name, row["provider"], row["error"])
        timed = [r for r in rows if "ms" in r]
        assert {r["provider"] for r in timed} >= {"llama3hp", "torch"}
        assert {r["mode"] for r in timed} == modes  # fwd, bwd, fwd+bwd (decode kernels: fwd only)
        for r in timed:
            assert r["ms"] > 0 and r["value"] > 0 and r["frac_of_peak"] > 0
        table = (tmp_path / f"{name}.md").read_text()
        assert "| shape | mode | llama3hp ms" in table and "speedup vs torch" in table


def test_build_mode_bwd_times_backward_only():
    x = torch.randn(5, requires_grad=True)
    calls = []

    def forward():
        calls.append(1)
        return x * 2

    bwd = harness.build_mode(forward, "bwd")
    bwd()
    bwd()
    assert len(calls) == 1 and x.grad is not None  # forward ran once, outside the timed closure
    fwd_bwd = harness.build_mode(forward, "fwd+bwd")
    fwd_bwd()
    assert len(calls) == 2


def test_markdown_has_target_ratio_columns():
    rows = [
        {
            "shape_str": "n=1",
            "mode": "fwd",
            "provider": p,
            "ms": ms,
            "value": 1.0,
            "frac_of_peak": 0.9,
            "peak_mem_mb": mem,
        }
        for p, ms, mem in [("llama3hp", 1.0, 10.0), ("torch", 3.0, 100.0), ("liger", 1.5, 20.0)]
    ]
    bench = harness.Benchmark(
        name="x", shapes=[], quick_shapes=[], make_inputs=None, providers={}, work=None, memory=True
    )
    table = harness.markdown_table(bench, rows, {"copy_gbps": 1.0, "matmul_tflops": 1.0})
    line = [ln for ln in table.splitlines() if ln.startswith("| n=1")][0]
    assert "3.00x" in line and "1.50x" in line and "10%" in line and "90%" in line
    assert "Agreement" not in table
    rows[2]["rel_err_vs_ours"] = {"out": 3.1e-3, "grads": "NotImplementedError: no backward"}
    table = harness.markdown_table(bench, rows, {"copy_gbps": 1.0, "matmul_tflops": 1.0})
    assert "| n=1 | liger | 3.1e-03 | NotImplementedError: no backward |" in table


# A peer that computes something else (another RoPE layout, another loss reduction, a different mask)
# would make every speedup in the tables meaningless. Each benchmark's providers, torch.compile ones
# included, run once on CPU on the same inputs and output gradients and must match llama3hp; the
# GPU runs record the same check in their rows (`rel_err_vs_ours`).
AGREEMENT_TOL = {("fp8_linear", "torch"): 0.08}  # the bf16 baseline against FP8: E4M3's few percent
CPU_BACKWARD_GAPS = ("does not support backward on CPU",)  # FlexAttention's backward is GPU-only


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rmsnorm", "rope", "swiglu", "cross_entropy", "attention", "fp8_linear"])
def test_every_provider_computes_what_llama3hp_computes(name):
    bench = importlib.import_module(f"benchmarks.bench_{name}").BENCH
    checked = set()
    with harness.compile_on_cpu():
        for shape in bench.quick_shapes:
            agree = harness.agreement(bench, shape, torch.device("cpu"), torch.float32, list(bench.providers))
            for provider, err in agree.items():
                tol = AGREEMENT_TOL.get((name, provider), 2e-5)
                assert err["out"] <= tol, (shape, provider, err)
                if isinstance(err["grads"], str):
                    assert any(gap in err["grads"] for gap in CPU_BACKWARD_GAPS), (shape, provider, err)
                else:
                    assert err["grads"] <= tol, (shape, provider, err)
                checked.add(provider)
    assert "torch" in checked  # the eager reference always runs on CPU
    if name != "fp8_linear":  # its peers are FP8 variants (GPU-only) and bf16 torch.mm
        assert any("compile" in p or p == "flex" for p in checked), checked


def test_agreement_catches_a_peer_that_computes_something_else():
    bench = importlib.import_module("benchmarks.bench_swiglu").BENCH
    wrong = dict(bench.providers, wrong=lambda inp, shape: lambda: inp["gate"] * inp["up"])
    agree = harness.agreement(
        dataclasses.replace(bench, providers=wrong), bench.quick_shapes[0], torch.device("cpu"),
        torch.float32, ["torch", "wrong"],
    )  # fmt: skip
    assert agree["torch"]["out"] < 1e-6 and agree["wrong"]["out"] > 0.1 and agree["wrong"]["grads"] > 0.1


@pytest.mark.slow
def test_gpu_session_script_runs_its_phases_and_collects_on_cpu(tmp_path):
    """benchmarks/gpu_session.sh is what a lent GPU runs, and nothing else ever runs it: on CPU every
    benchmark of a phase refuses with its one-line reason, the script records each exit code and
    goes on, and env.txt, session.log and results.tgz land in $OUT."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "LIMIT_S": "240"}
    subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "kernels", "nonsense"], cwd=repo, env=env, check=True,
        capture_output=True, timeout=300,
    )  # fmt: skip
    env_txt = (out / "env.txt").read_text()
    for name in ("rmsnorm", "rope", "swiglu", "cross_entropy"):
        assert f"bench_{name}: exit 1" in env_txt, env_txt
    assert "unknown phase nonsense" in env_txt and "torch " in env_txt
    assert (out / "session.log").read_text().count("need a CUDA GPU") == 4
    with tarfile.open(out / "results.tgz") as tar:
        assert any(n.startswith("benchmarks/results/") for n in tar.getnames())
