"""`llama3hp generate` and `llama3hp serve` as a user runs them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serving_testing import free_port, tiny_model

from llama3hp.cli import main
from llama3hp.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    """A run folder with one checkpoint, as `make train` leaves it."""
    run = tmp_path_factory.mktemp("runs") / "tiny-20261201-120000"
    model = tiny_model()
    ckpt.save_checkpoint(run / "checkpoints", 3, model_state=model.state_dict(), optim_state=None,
                         train_state={"model_args": dataclasses.asdict(model.args)})  # fmt: skip
    return run


def test_generate_prints_the_continuation_and_a_rate(run_ckpt, capsys):
    assert (
        main(["generate", "--checkpoint", str(run_ckpt), "--prompt", "def main():", "--max-tokens", "5"]) == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith("def main():") and len(out) > len("def main():")
    assert "5 tokens in" in err and "tokens/s" in err and "finish: length" in err


def test_generate_chat_with_samples(run_ckpt, capsys):
    argv = ["generate", "--checkpoint", str(run_ckpt), "--prompt", "hi", "--chat", "--n", "2", "--temperature",
            "0.8", "--seed", "1", "--max-tokens", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--- sample 0" in out and "--- sample 1" in out


@pytest.mark.parametrize(
    "argv, contains",
    [
        (["generate", "--checkpoint", "/nope", "--prompt", "x"], "checkpoint not found"),
        (["generate", "--checkpoint", "{ck}", "--prompt", "x", "--temperature", "9"], "temperature"),
        (["generate", "--checkpoint", "{ck}", "--prompt", "x", "--max-tokens", "100000"], "context"),
        (["serve", "--checkpoint", "{ck}", "--dtype", "int3"], "--dtype"),
        (["serve", "--checkpoint", "{ck}", "--tp", "0"], "--tp"),
    ],
)
def test_bad_command_lines_are_one_line_errors(run_ckpt, capsys, argv, contains):
    code = main([a.replace("{ck}", str(run_ckpt)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and contains in err[0], err


def test_serve_answers_the_openai_client(run_ckpt):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama3hp.cli", "serve", "--checkpoint", str(run_ckpt), "--port", str(port),
         "--kv-memory-gib", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-20261201-120000"]
        r = client.chat.completions.create(model="tiny-20261201-120000", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)  # fmt: skip
        assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "serving tiny-20261201-120000" in out and f"http://127.0.0.1:{port}/v1" in out
