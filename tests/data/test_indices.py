"""Index builders: C++ (llama3hp._C) against the numpy fallback, and the standalone cmake/ctest build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import llama3hp
from llama3hp.data import indices
from llama3hp.data.errors import DataError

REPO = Path(__file__).resolve().parents[2]
needs_cpp = pytest.mark.skipif(not llama3hp.has_cpp_ext(), reason="llama3hp._C not built")


def test_sample_idx_known_case():
    out = indices.build_sample_idx_py(np.array([3, 0, 5, 2]), 3)
    assert out.tolist() == [[0, 0], [2, 0], [2, 3], [3, 1]]
    assert indices.build_sample_idx_py(np.array([2, 2]), 2).tolist() == [[0, 0], [1, 0], [2, 0]]


def random_sizes(rng: np.random.Generator, min_n: int = 0) -> tuple[np.ndarray, int]:
    """Segment sizes with about 20% empty segments, and a seq_len."""
    n = int(rng.integers(min_n, 60))
    return rng.integers(0, 30, size=n) * (rng.random(n) > 0.2), int(rng.integers(1, 40))


@needs_cpp
def test_cpp_matches_python_on_random_inputs():
    from llama3hp import _C

    rng = np.random.default_rng(0)
    for trial in range(200):
        sizes, T = random_sizes(rng)
        assert np.array_equal(_C.build_sample_idx(sizes, T), indices.build_sample_idx_py(sizes, T)), trial
        d = int(rng.integers(1, 6))
        w = rng.random(d) + 1e-3
        w = w / w.sum()
        counts = rng.integers(0, 50, size=d)
        m = int(rng.integers(0, 300))
        got = _C.build_blending_indices(w, counts, m)
        want = indices.build_blending_indices_py(w, counts, m)
        for g, x in zip(got, want):
            assert np.array_equal(g, x), trial
    # Exact ties (equal weights) go to the lowest index in both.
    w = np.full(3, 1 / 3)
    assert _C.build_blending_indices(w, np.zeros(3, np.int64), 6)[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert indices.build_blending_indices_py(w, np.zeros(3), 6)[0].tolist() == [0, 1, 2, 0, 1, 2]


@needs_cpp
def test_cpp_gathers_a_shuffled_order_like_numpy():
    """sizes[doc_idx[k]] inside the loop gives the rows of gathering first, for int32 and int64 inputs."""
    rng = np.random.default_rng(1)
    for trial in range(100):
        sizes, T = random_sizes(rng, min_n=1)
        n = sizes.size
        doc_idx = rng.permutation(n) if trial % 2 else rng.integers(0, n, size=int(rng.integers(0, 80)))
        want = indices.build_sample_idx_py(sizes[doc_idx], T)
        for sd in (np.int32, np.int64, np.uint32):
            for dd in (np.int32, np.int64):
                got = indices.build_sample_idx(sizes.astype(sd), T, doc_idx.astype(dd))
                assert got.dtype == np.int64 and np.array_equal(got, want), (trial, sd, dd)
        assert np.array_equal(indices.build_sample_idx_py(sizes, T, doc_idx), want)
    with pytest.raises(DataError, match=r"doc_idx\[1\] = 5 is out of range \[0, 3\)"):
        indices.build_sample_idx(np.array([1, 2, 3]), 2, np.array([0, 5]))
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        indices.build_sample_idx_py(np.array([1, 2, 3]), 2, np.array([0, 5]))
    with pytest.raises(DataError, match="is negative"):
        indices.build_sample_idx(np.array([1, -2, 3], np.int32), 2, np.array([2, 1], np.int32))


@needs_cpp
def test_cpp_argument_checks():
    from llama3hp import _C

    with pytest.raises(ValueError, match="sizes must have an integer dtype"):
        _C.build_sample_idx(np.array([1.5]), 2)
    with pytest.raises(ValueError, match="must be 1-D"):
        _C.build_sample_idx(np.zeros((2, 2), np.int64), 2)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        _C.build_sample_idx(np.array([1]), 0)
    with pytest.raises(ValueError, match="one per dataset"):
        _C.build_blending_indices(np.array([0.5, 0.5]), np.zeros(3, np.int64), 1)
    with pytest.raises(ValueError, match="finite and > 0"):
        _C.build_blending_indices(np.array([1.0, 0.0]), np.zeros(2, np.int64), 1)
    with pytest.raises(DataError, match="seq_len"):
        indices.build_sample_idx(np.array([1]), 0)


def test_blending_resumes_from_counts():
    w = np.array([0.5, 0.25, 0.17, 0.08])
    full = indices.build_blending_indices(w, np.zeros(4, np.int64), 97)
    a = indices.build_blending_indices(w, np.zeros(4, np.int64), 40)
    b = indices.build_blending_indices(w, a[2], 57)
    assert np.array_equal(np.concatenate([a[0], b[0]]), full[0])
    assert np.array_equal(np.concatenate([a[1], b[1]]), full[1])


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(indices, "_C", None)
    monkeypatch.setattr(indices, "_warned", False)
    with pytest.warns(UserWarning, match="numpy index builders"):
        out = indices.build_sample_idx(np.array([4, 4]), 3)
    assert out.tolist() == [[0, 0], [0, 3], [1, 2]]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indices.build_blending_indices(np.array([1.0]), np.zeros(1, np.int64), 3)


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    build = tmp_path / "cpp"
    run = lambda *cmd, cwd=None: subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    for cmd, cwd in (
        (("cmake", "-S", str(REPO), "-B", str(build)), None),
        (("cmake", "--build", str(build)), None),
        (("ctest", "--output-on-failure"), build),
    ):
        r = run(*cmd, cwd=cwd)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_cpp
def test_loader_rows_identical_with_and_without_cpp(synth, monkeypatch):
    from data_testing import FAKE_SHA

    from llama3hp.data import DataConfig, build_loader

    (p1, _), (p2, _) = synth("a", 40, 1), synth("b", 25, 2, first_id=10_000)
    cfg = DataConfig(datasets=[f"{p1}:0.6", f"{p2}:0.4"], seed=3)
    plan = [(3, 8), (2, 8), (2, 13), (4, 6)]
    with_cpp = build_loader(cfg, tokenizer_sha256=FAKE_SHA)
    want = [with_cpp.next_batch(r, t) for r, t in plan]
    monkeypatch.setattr(indices, "_C", None)
    monkeypatch.setattr(indices, "_warned", True)
    without = build_loader(cfg, tokenizer_sha256=FAKE_SHA)
    for (r, t), w in zip(plan, want):
        got = without.next_batch(r, t)
        assert np.array_equal(got.inputs.numpy(), w.inputs.numpy())
        assert np.array_equal(got.cu_seqlens.numpy(), w.cu_seqlens.numpy())
