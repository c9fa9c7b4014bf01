"""Fixtures of the serving tests: tiny Llama 3 models with the full 128K vocabulary (so the real
tokenizer's ids fit), the tokenizer, briefly trained checkpoints and a live HTTP server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llama3hp.data.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models' ops take microseconds, and on a loaded 2-core machine a
    second OpenMP thread waiting at each op's barrier costs milliseconds (measured: a 12-token
    generation 7.3 s with 2 threads, 0.22 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the trainer: "fp32" (24 steps: a model whose perplexity means something),
    "bf16" and "fp8" (rowwise recipe), 2 steps each. {recipe: checkpoint folder}."""
    from serving_testing import TRAIN, TRAIN_FILES

    from llama3hp.config import load_job_config
    from llama3hp.data import prepare
    from llama3hp.train.trainer import train

    root = tmp_path_factory.mktemp("trained")
    stdlib = os.path.dirname(os.__file__)
    prepare([os.path.join(stdlib, f) for f in TRAIN_FILES], root / "data", workers=1)
    short = ["training.warmup_steps=1"]
    runs = {"fp32": (24, []), "bf16": (2, ["training.dtype=bfloat16", *short]),
            "fp8": (2, ["fp8.recipe=rowwise", *short])}  # fmt: skip
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread; a session fixture is set up before it
    for name, (steps, extra) in runs.items():
        job = load_job_config("tiny", [
            *TRAIN, f'data.datasets=["{root / "data"}"]', f"run_dir={root / name}", f"training.steps={steps}",
            f"checkpoint.interval={steps}", *extra,
        ])  # fmt: skip
        out[name] = train(job).last_checkpoint
    torch.set_num_threads(threads)
    return out
