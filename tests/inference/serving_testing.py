"""Shared by the serving tests (a uniquely named module: several test folders have a conftest.py)."""

from __future__ import annotations

import socket
import threading
import time

import torch

from llama3hp.model import ModelArgs, Transformer


def tiny_args(**kw) -> ModelArgs:
    """dim 64, 4 blocks (FP8 serving quantizes the inner two), GQA 2:1, the full 128K vocabulary
    (the real tokenizer's ids fit), context 512."""
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=None,
                max_seq_len=512)  # fmt: skip
    base.update(kw)
    return ModelArgs(**base)


def tiny_model(seed: int = 1, **kw) -> Transformer:
    model = Transformer(tiny_args(**kw))
    model.init_weights(seed)
    return model.requires_grad_(False).eval()


@torch.no_grad()
def greedy_by_recompute(model: Transformer, prompt: list[int], n_new: int) -> list[int]:
    """Greedy tokens by running the whole forward over prompt + generated at every step (no cache)."""
    toks = list(prompt)
    for _ in range(n_new):
        toks.append(int(model(torch.tensor([toks])).logits()[0, -1].argmax()))
    return toks[len(prompt) :]


# A shrunk Llama 3 for the trainer: 2 rows of 64 tokens per step on a few stdlib files.
TRAIN = [
    "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=64",
    "training.seq_len=64", "training.micro_batch_rows=2", "training.global_batch_rows=2",
    "training.warmup_steps=3", "training.lr=1e-2", "metrics.progress=false", "metrics.plot=false",
    "checkpoint.enabled=true", "checkpoint.keep=0",
]  # fmt: skip
TRAIN_FILES = ("os.py", "random.py", "bisect.py")  # textwrap.py is held out
HELD_OUT = "textwrap.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a thread, stopped by `close`."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())
