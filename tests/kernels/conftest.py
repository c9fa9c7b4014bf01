"""Fixtures for the kernel tests: poisoned allocations so an element a kernel forgets to write fails."""

import pytest
import torch


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(torch.iinfo(t.dtype).min)
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Makes torch.empty / torch.empty_like return NaN-filled tensors for the duration of a test.

    The kernels allocate their outputs with these, so an output element left unwritten by a
    launch stays NaN and fails the comparison against the reference.
    """
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def _kernel_device():
    """On a GPU machine the same tests check the compiled kernels: tensors are created on CUDA (on CPU
    they stay on the CPU, where conftest's TRITON_INTERPRET=1 runs the kernels in the interpreter)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")
