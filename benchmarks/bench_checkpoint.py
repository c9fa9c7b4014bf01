"""How long a checkpoint blocks the training loop: synchronous save against `checkpoint.async` (CPU).

    python -m benchmarks.bench_checkpoint                 # the 1B preset's width, --layers of its 16
    python -m benchmarks.bench_checkpoint --quick         # a tiny model, seconds (CI)

A model of the `llama3_1b` preset (dim 2048, 128K vocabulary, untied head) with `--layers` of its
blocks, AdamW state created by one step, saved through `Checkpointer` exactly as the trainer saves
it: `--reps` synchronous saves (DCP write, SHA-256 manifest, rename, `latest`) and `--reps` async
saves (the copy into CPU buffers the loop waits for; the write and the commit in the background),
each async save followed by a wait for its background write before the next one, so the two never
overlap. The first async save allocates its CPU buffers (pages faulted in): it is reported apart
from the steady state, where later saves reuse them.

Target (issue 16): steady-state blocking time of an async save <= 10% of a synchronous save's.
The whole 1B preset (1.5B parameters: 18 GB of weights and AdamW moments, and as much again for
the staging copy) does not fit this 24 GiB machine twice, hence `--layers`: both costs are linear in
the bytes saved, so the ratio carries over.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.workload import header, parse_args, publish


def build(layers: int, quick: bool):
    import torch

    from llama3hp.model import Transformer, get_model_args
    from llama3hp.parallel.step_model import LocalModel

    args = get_model_args("llama3_1b")
    args = dataclasses.replace(args, n_layers=layers)
    if quick:
        args = dataclasses.replace(args, dim=128, n_heads=4, n_kv_heads=2, vocab_size=4096, n_layers=2)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for p in model.parameters():  # one AdamW step creates the moments without a forward pass
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in model.parameters())
    return LocalModel(model), opt, n, args


def main(argv: list[str] | None = None) -> Path:
    import argparse

    from llama3hp.train.checkpointer import CheckpointConfig, Checkpointer

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--layers", type=int, default=1, help="blocks of the 1B preset's 16 (memory: see above)")
    ap.add_argument("--dir", default=None, help="checkpoint folder (default: a temporary one)")
    own, rest = ap.parse_known_args(argv)
    args = parse_args(rest, __doc__, reps=3)
    model, opt, n_params, margs = build(own.layers, args.quick)
    state_gb = n_params * 12 / 1e9  # fp32 weights + two AdamW moments
    root = Path(own.dir) if own.dir else Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    rows = []
    for mode in ("sync", "async"):
        folder = root / mode
        cfg = CheckpointConfig(keep=1, async_save=mode == "async")
        cp = Checkpointer(cfg, folder, model, opt, None, lambda: {"tokens_seen": 0}, log=lambda _: None)
        blocked, written = [], []
        for step in range(1, args.reps + 2 if mode == "async" else args.reps + 1):
            t0 = time.perf_counter()
            blocked.append(cp.save(step))
            cp.wait()  # async: the background write, outside the blocking time
            written.append(time.perf_counter() - t0)
        steady = blocked[1:] if mode == "async" else blocked
        rows.append(
            {
                "provider": mode,
                "params": n_params,
                "state_gb": round(state_gb, 2),
                "layers": margs.n_layers,
                "dim": margs.dim,
                "reps": len(steady),
                "blocking_s": round(statistics.median(steady), 4),
                "first_blocking_s": round(blocked[0], 4),
                "save_total_s": round(statistics.median(written), 3),
            }
        )
        shutil.rmtree(folder, ignore_errors=True)
    sync_s = rows[0]["blocking_s"]
    for r in rows:
        r["blocking_vs_sync"] = round(r["blocking_s"] / sync_s, 4)
    if not own.dir:
        shutil.rmtree(root, ignore_errors=True)
    return publish("checkpoint", rows, [], markdown, args)


def markdown(rows: list[dict], env: dict) -> str:
    lines = header("Checkpoint blocking time: synchronous vs async (CPU)", env)
    r0 = rows[0]
    lines += [
        f"llama3_1b width (dim {r0['dim']}, 128K vocabulary) with {r0['layers']} block(s): {r0['params'] / 1e6:.0f}M "
        f"parameters, {r0['state_gb']:.2f} GB of fp32 weights and AdamW moments per save.",
        "",
        "| save | blocking s (median) | first save blocking s | save written s | blocking / sync |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['provider']} | {r['blocking_s']:.3f} | {r['first_blocking_s']:.3f} | {r['save_total_s']:.2f} | "
            f"{100 * r['blocking_vs_sync']:.1f}% |"
        )
    lines += [
        "",
        "blocking = the time `Checkpointer.save` held the loop; async: steady state (buffers reused), the "
        "first save (buffers allocated) apart; written = until the checkpoint was committed (`latest`).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
