"""Fixtures for the FP8 tests: poisoned allocations so an element a kernel forgets to write fails."""

import pytest
import torch


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():  # float8 included: both formats have a NaN encoding
        t.fill_(float("nan"))
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors during the test (kernel outputs use them)."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    yield
