"""The CPU workload benchmarks' pieces on tiny inputs: rows carry what the tables need, peers optional."""

from __future__ import annotations

import pytest

from benchmarks import bench_curate, bench_data_path
from benchmarks.workload import environment


def test_curate_rows_on_planted_duplicates(tmp_path):
    folder, n_docs, n_bytes = bench_curate.write_planted(tmp_path, 40)
    rows = bench_curate.minhash_rows("planted", folder, n_docs, n_bytes, 1, tmp_path, peer_runs=False)
    assert [r["case"] for r in rows] == [
        "planted: minhash e2e (threshold 0.8)",
        "planted: minhash e2e (threshold 0.0)",
    ]
    assert n_docs == 50 and all(r["removed_ours"] == 10 and r["docs_per_s"] > 0 for r in rows)
    table = bench_curate.markdown(rows, environment(["datatrove"]))
    assert "| planted: minhash e2e (threshold 0.8) |" in table and "n/a" in table


def test_data_path_rows_agree_with_megatron_when_installed():
    mg = bench_data_path.megatron_helpers()
    rows = bench_data_path.sample_idx_cases(3000, 64, 1, mg)
    rows.append(bench_data_path.blending_case(1000, 1, mg))
    assert [r["case"] for r in rows] == ["sample_idx in order", "sample_idx shuffled", "blending 4-way"]
    assert rows[0]["n_samples"] == rows[1]["n_samples"] > 0
    if mg is None:
        pytest.skip("megatron-core is not installed: only our side ran")
    assert rows[0]["rows_agree"] and rows[1]["rows_agree"] and rows[2]["speedup"] > 0
    assert rows[2]["shares_ours"] == rows[2]["shares_megatron"]
