"""Kernel tests run on CUDA when a GPU is present (fixtures in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _device(cuda_when_available):
    yield
