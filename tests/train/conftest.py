"""Fixtures for the trainer tests."""

import os

import pytest

from llama3hp.data import prepare


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A few stdlib sources tokenized with `prepare` (a few hundred thousand tokens at most)."""
    root = os.path.dirname(os.__file__)
    files = [os.path.join(root, f) for f in ("os.py", "random.py", "textwrap.py", "bisect.py")]
    out = tmp_path_factory.mktemp("data") / "small"
    prepare(files, out, workers=1)
    return out
