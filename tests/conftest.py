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


@pytest.fixture
def bf16_round_to_nearest(monkeypatch):
    """Makes the interpreter round fp32 -> bf16 casts to nearest-even, as the GPU does.

    The interpreter truncates them (its own bf16 emulation), a bias toward zero that roughly doubles
    the error of a bf16 computation; with this, a kernel's bf16 stores round like the GPU's and like
    torch's own bf16 casts, so an end-to-end bf16 comparison measures the kernels, not the
    interpreter. No-op on a GPU or if the interpreter's internals have moved.
    """
    if _HAS_CUDA:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast_impl = getattr(builder, "cast_impl", None)
    if cast_impl is None or not hasattr(interpreter, "TensorHandle"):
        pytest.skip("this Triton's interpreter has no cast_impl to make bf16 casts round to nearest")

    def rounded(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return cast_impl(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", rounded)
    yield
