"""Index builders for the packed loader: C++ (`llama3hp._C`) when built, numpy otherwise.

Both paths give identical arrays (tests cross-check them on random inputs):

- `build_sample_idx(sizes [n] int, seq_len) -> int64 [n_samples + 1, 2]`: sample boundaries over
  segments holding sizes[k] (input, target) pairs each; row i = (segment position, offset) of pair
  i * seq_len, skipping empty segments; n_samples = sum(sizes) // seq_len.
- `build_blending_indices(weights [d] float, counts [d] int, n) -> (dataset_index int32 [n],
  dataset_sample_index int64 [n], counts_after int64 [d])`: greedy blending that gives each next
  sample to the dataset lagging its target share the most (ties to the lowest index); continuing
  from saved `counts` reproduces one long call.

Seeded permutations (document order per epoch, sample order per round) live here too, so every
random choice of the loader is keyed in one place.
"""

from __future__ import annotations

import warnings

import numpy as np

from llama3hp.data.errors import DataError

__all__ = [
    "build_sample_idx",
    "build_blending_indices",
    "build_sample_idx_py",
    "build_blending_indices_py",
    "seeded_permutation",
    "has_cpp",
]

try:
    from llama3hp import _C  # type: ignore[attr-defined]  # the compiled extension has no stubs
except ImportError:  # the extension is optional: numpy fallback below
    _C = None

_warned = False

DOC_SHUFFLE = 1
SAMPLE_SHUFFLE = 2


def has_cpp() -> bool:
    return _C is not None


def _fallback_warning() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "llama3hp._C is not built: using the numpy index builders (same results, slower); "
            "rebuild with `pip install --no-build-isolation -e .`",
            stacklevel=3,
        )


def _as_sizes(sizes: np.ndarray) -> np.ndarray:
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu":
        raise DataError(
            f"build_sample_idx: sizes must be a 1-D integer array, got shape {sizes.shape} {sizes.dtype}"
        )
    return sizes.astype(np.int64, copy=False)


def build_sample_idx_py(sizes: np.ndarray, seq_len: int) -> np.ndarray:
    sizes = _as_sizes(sizes)
    if seq_len < 1:
        raise DataError(f"build_sample_idx: seq_len must be >= 1, got {seq_len}")
    if sizes.size and sizes.min() < 0:
        raise DataError("build_sample_idx: sizes are pair counts and must be >= 0")
    cum = np.concatenate([[0], np.cumsum(sizes)])
    n_samples = int(cum[-1]) // seq_len
    targets = np.arange(n_samples + 1, dtype=np.int64) * seq_len
    # Last segment starting at or before the target; with empty segments this is the non-empty one.
    k = np.searchsorted(cum, targets, side="right") - 1
    k = np.minimum(k, sizes.size)
    off = targets - cum[k]
    out = np.stack([k, np.where(k < sizes.size, off, 0)], axis=1).astype(np.int64)
    return out


def build_blending_indices_py(
    weights: np.ndarray, counts: np.ndarray, n_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64)
    c = np.array(counts, dtype=np.int64)
    if w.ndim != 1 or w.size < 1 or c.shape != w.shape:
        raise DataError("build_blending_indices: weights and counts must be 1-D with one entry per dataset")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise DataError(f"build_blending_indices: weights must be finite and > 0, got {w.tolist()}")
    if np.any(c < 0) or n_samples < 0:
        raise DataError("build_blending_indices: counts and n_samples must be >= 0")
    start = int(c.sum())
    ds_idx = np.empty(n_samples, dtype=np.int32)
    ds_sample = np.empty(n_samples, dtype=np.int64)
    for t in range(n_samples):
        err = w * float(start + t + 1) - c.astype(np.float64)
        d = int(np.argmax(err))  # first maximum: ties go to the lowest index, as in C++
        ds_idx[t] = d
        ds_sample[t] = c[d]
        c[d] += 1
    return ds_idx, ds_sample, c


def build_sample_idx(sizes: np.ndarray, seq_len: int) -> np.ndarray:
    if _C is None:
        _fallback_warning()
        return build_sample_idx_py(sizes, seq_len)
    sizes = _as_sizes(sizes)
    try:
        return _C.build_sample_idx(np.ascontiguousarray(sizes), int(seq_len))
    except ValueError as e:
        raise DataError(str(e)) from None


def build_blending_indices(
    weights: np.ndarray, counts: np.ndarray, n_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if _C is None:
        _fallback_warning()
        return build_blending_indices_py(weights, counts, n_samples)
    try:
        return _C.build_blending_indices(
            np.ascontiguousarray(weights, dtype=np.float64),
            np.ascontiguousarray(counts, dtype=np.int64),
            int(n_samples),
        )
    except ValueError as e:
        raise DataError(str(e)) from None


def seeded_permutation(n: int, seed: int, dataset: int, kind: int, number: int) -> np.ndarray:
    """Permutation of range(n) keyed by (seed, dataset position, kind, epoch/round number)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, dataset, kind, number])))
    return rng.permutation(n).astype(np.int64)
