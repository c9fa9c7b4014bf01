"""benchmarks/bench_serve.py --quick runs end to end (shrunk further) and writes well-formed rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_serve

pytestmark = pytest.mark.xdist_group("inference_server")


def test_quick_serving_benchmark_writes_every_row(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--requests", "3", "--new-tokens", "4", "--decode-batches", "1", "2",
            "--precisions", "bf16", "--threads", "1", "--rate", "50"]  # fmt: skip
    bench_serve.main(argv)
    rows = json.loads((tmp_path / "serve.json").read_text())
    got = {(r["provider"], r["mode"]) for r in rows}
    want = {("llama3hp", m) for m in ("prefill", "decode_b1", "decode_b2", "target", "poisson")}
    want |= {("hf", "prefill"), ("hf", "decode_b1"), ("hf", "decode_b2"), ("hf-sequential", "target"),
             ("hf-batched", "target"), ("hf-fifo", "poisson")}  # fmt: skip
    assert got == want
    for r in rows:
        assert {"torch", "triton", "date", "command", "device"} <= r.keys()
        assert r.get("tokens_per_s", 1) > 0 and r.get("ttft_p50_ms", 1) > 0
    md = (tmp_path / "serve.md").read_text()
    assert "vs HF generate one at a time" in md and "TTFT p50" in md
