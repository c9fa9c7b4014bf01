"""Blending several prepared datasets by weight (e.g. the paper's 0.50 / 0.25 / 0.17 / 0.08 mix).

Global sample j goes to the dataset whose realised sample count lags its target share
w_d * (j + 1) the most, ties to the lowest index (`indices.build_blending_indices`). The rule
depends only on the per-dataset counts so far, so a blend resumes from those counts and every
data-parallel rank computes the same assignment. A dataset that runs out simply starts its next
epoch (new document shuffle), so small, upweighted datasets are repeated as needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llama3hp.data.errors import DataError
from llama3hp.data.indices import build_blending_indices

__all__ = ["DatasetSpec", "parse_dataset_spec", "resolve_weights", "Blend"]


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    weight: float | None  # None: not given (then every spec must omit it)


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """'path' or 'path:weight' (weight a positive number)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec {spec!r} is empty; use 'path' or 'path:weight'")
    if ":" not in spec:
        return DatasetSpec(spec, None)
    path, _, w = spec.rpartition(":")
    try:
        weight = float(w)
    except ValueError:
        raise DataError(
            f"dataset spec {spec!r}: weight {w!r} is not a number; use 'path' or 'path:weight'"
        ) from None
    if not path:
        raise DataError(f"dataset spec {spec!r} has no path; use 'path' or 'path:weight'")
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"dataset spec {spec!r}: weight must be a positive finite number, got {w!r}")
    return DatasetSpec(path, weight)


def resolve_weights(specs: list[DatasetSpec], n_tokens: list[int]) -> np.ndarray:
    """Normalised float64 weights: as given, or proportional to token counts when none is given."""
    given = [s.weight is not None for s in specs]
    if any(given) and not all(given):
        missing = [s.path for s in specs if s.weight is None]
        raise DataError(
            f"datasets {missing} have no weight while others do; give every dataset a weight or none"
        )
    w = np.array([s.weight for s in specs] if all(given) else n_tokens, dtype=np.float64)
    return w / w.sum()


class Blend:
    """Stateful greedy blend: `take(n)` assigns the next n global samples to datasets."""

    def __init__(self, weights: np.ndarray, counts: np.ndarray | None = None):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.counts = (
            np.zeros(self.weights.size, np.int64) if counts is None else np.array(counts, dtype=np.int64)
        )

    @property
    def position(self) -> int:
        return int(self.counts.sum())

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset_index int32 [n], dataset_sample_index int64 [n]) for global samples position..+n."""
        ds_idx, ds_sample, self.counts = build_blending_indices(self.weights, self.counts, n)
        return ds_idx, ds_sample
