"""What shared-prompt packing saves on the demo preference set: tokens, rows and DPO step time.

python -m benchmarks.shared_prompt [--pairs 48] [--out DIR]   (needs `llama3hp prepare --demo preference`)

Packs the first --pairs pairs of data/demo-preference/train both ways at the tiny config's row
length (512): [prompt | chosen | rejected] (the prompt once, the attention's shared prefix) and
[prompt chosen] [prompt rejected]; counts rows and non-padding tokens, and times the DPO forward and
backward of those rows on the tiny model (one process, fp32 on CPU; reference values 0). Results go
to benchmarks/results/cpu/shared_prompt.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.workload import environment, header, write_results


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo-preference/train")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from llama3hp.data.examples import PAD_ID, ExampleLoader
    from llama3hp.data.shards import TokenDataset
    from llama3hp.model import Transformer, get_model_args
    from llama3hp.parallel import LocalModel
    from llama3hp.posttrain.dpo import DPOLoss

    ds = TokenDataset(args.data)
    torch.manual_seed(0)
    model = Transformer(get_model_args("tiny"))
    model.init_weights(seed=0)
    step = LocalModel(model)
    rows = []
    full = {}
    for pack in ("separate", "shared_prompt"):
        loader = ExampleLoader([ds], pack_pairs=pack)
        full[pack] = sum(int((b.inputs != PAD_ID).sum()) for b in loader.epoch_batches(1, args.seq_len))
        batches = loader.epoch_batches(1, args.seq_len, limit=args.pairs)
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
    env = environment(["torch"])
    rows = [{"bench": "shared_prompt", **r, **env} for r in rows]
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
        f"{sh['pairs']} pairs (best of {args.reps}; 2 shared cores).",
    ]
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "cpu"
    return write_results("shared_prompt", rows, "\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
