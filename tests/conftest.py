"""Test-session set-up shared by every test module.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton is first imported (kernels are wrapped at decoration time), so it is set here, before any
test module imports llama3hp.kernels.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _poison(t):
    if t.is_floating_point():  # float8 included: both formats have a NaN encoding
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(torch.iinfo(t.dtype).min)
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Makes torch.empty / torch.empty_like return poisoned (NaN / int-min) tensors during a test.

    Kernels allocate their outputs with these, so an element a launch leaves unwritten stays NaN
    and fails the comparison against the reference.
    """
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    yield


@pytest.fixture
def cuda_when_available():
    """Kernel tests create tensors on CUDA when a GPU is present, so the same tests check the compiled
    kernels there; on CPU they stay on the CPU, where TRITON_INTERPRET=1 runs the kernels."""
    if not _HAS_CUDA:
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")
