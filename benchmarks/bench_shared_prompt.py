"""What shared-prompt packing saves on the demo preference set: tokens, rows and DPO step time.

    python -m benchmarks.bench_shared_prompt [--pairs 48]   # needs `llama3hp prepare --demo preference`
    python -m benchmarks.bench_shared_prompt --quick        # CI-sized: 40 stdlib functions, a shrunk model

Packs the first --pairs pairs of data/demo-preference/train both ways at the tiny config's row
length (512): [prompt | chosen | rejected] (the prompt once, the attention's shared prefix) and
[prompt chosen] [prompt rejected]; counts rows and non-padding tokens, and times the DPO forward and
backward of those rows on the tiny model (one process, fp32 on CPU; reference values 0). Results go
to benchmarks/results/cpu/shared_prompt.{json,md}. The peer is our own packing with sharing off.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workload import header, parse_args, publish


def quick_dataset(folder: Path) -> str:
    """A preference dataset of 40 stdlib functions' demo pairs (seconds to build)."""
    from llama3hp.data import prepare
    from llama3hp.data.demo import demo_rows, stdlib_functions

    train, heldout = demo_rows("preference", stdlib_functions()[:40])
    rows = folder / "pairs.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in train + heldout))
    prepare([rows], folder / "pref", format="preference", workers=1)
    return str(folder / "pref")


def markdown(rows: list[dict], env: dict) -> str:
    sep, sh = rows
    lines = header("Shared-prompt packing on the demo preference set (tiny model, CPU)", env)
    lines += [
        "| packing | pairs | rows of 512 | tokens | DPO fwd+bwd s | whole train set: tokens |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['packing']} | {r['pairs']} | {r['rows']} | {r['tokens']:,} | {r['dpo_fwd_bwd_s']:.1f} | "
            f"{r['epoch_tokens']:,} |"
            for r in rows
        ),  # fmt: skip
        "",
        f"Shared prompt: {100 * (1 - sh['epoch_tokens'] / sep['epoch_tokens']):.0f}% fewer tokens over the "
        f"{sep['epoch_pairs']:,} training pairs, {100 * (1 - sh['rows'] / sep['rows']):.0f}% fewer rows and "
        f"{100 * (1 - sh['dpo_fwd_bwd_s'] / sep['dpo_fwd_bwd_s']):.0f}% less DPO step time for the same "
        f"{sh['pairs']} pairs (best of {sh['reps']}; 2 shared cores).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--data", default="data/demo-preference/train")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    own, rest = ap.parse_known_args(argv)
    args = parse_args(rest, __doc__, reps=2)
    pairs = own.pairs or (4 if args.quick else 48)

    from llama3hp.data.examples import PAD_ID, ExampleLoader
    from llama3hp.data.shards import TokenDataset
    from llama3hp.model import Transformer, get_model_args
    from llama3hp.parallel import LocalModel
    from llama3hp.posttrain.dpo import DPOLoss

    data = quick_dataset(Path(tempfile.mkdtemp(prefix="shared-prompt-"))) if args.quick else own.data
    ds = TokenDataset(data)
    torch.manual_seed(0)
    model_args = get_model_args("tiny")
    if args.quick:
        model_args = dataclasses.replace(
            model_args, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64
        )
    model = Transformer(model_args)
    model.init_weights(seed=0)
    step = LocalModel(model)
    rows = []
    full = {}
    for pack in ("separate", "shared_prompt"):
        loader = ExampleLoader([ds], pack_pairs=pack)
        full[pack] = sum(int((b.inputs != PAD_ID).sum()) for b in loader.epoch_batches(1, own.seq_len))
        batches = loader.epoch_batches(1, own.seq_len, limit=pairs)
        for b in batches:
            b.ref_logps = torch.zeros(b.pairs.shape[0], 2)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step.forward_backward(batches, DPOLoss())
            times.append(time.perf_counter() - t0)
            model.zero_grad()
        rows.append({
            "packing": pack, "pairs": sum(b.pairs.shape[0] for b in batches), "rows": len(batches),
            "tokens": sum(int((b.inputs != PAD_ID).sum()) for b in batches), "dpo_fwd_bwd_s": min(times),
            "epoch_tokens": full[pack], "epoch_pairs": ds.n_docs,
        })  # fmt: skip
        print(rows[-1], flush=True)
    return publish("shared_prompt", [{**r, "reps": args.reps} for r in rows], ["torch"], markdown, args)


if __name__ == "__main__":
    main()
