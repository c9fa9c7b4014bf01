"""Rejection sampling's generation: k samples per prompt with the prompt's KV blocks shared (one
request with n = k, copy-on-write) against the same engine with sharing off (k requests of n = 1).

The paper made rejection sampling affordable with PagedAttention's shared prompt (more than 2x
throughput). Both modes run the same `LLMEngine`, the same prompts and sampling settings, and
generate exactly `--new-tokens` per sample (ignore_eos), so they do the same decode work; what
differs is that sharing prefills each prompt once instead of k times and holds its KV blocks once.
Reported per mode: responses/s, generated tokens/s, the peak KV blocks in use (16 tokens each) and
their bytes. The reward model's scoring is left out: it is the same work in both modes.

    python -m benchmarks.bench_rejection            # tiny Llama 3 (dim 256), 512-token prompts, k = 16
    python -m benchmarks.bench_rejection --quick    # dim 64, 64-token prompts: seconds, for CI

Results: `benchmarks/results/cpu/rejection.{json,md}` (a full run), a temporary folder for --quick.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from benchmarks.workload import header, parse_args, publish
from llama3hp.inference.engine import EngineConfig, LLMEngine
from llama3hp.inference.kv_cache import bytes_per_block
from llama3hp.inference.sampling import SamplingParams
from llama3hp.model import ModelArgs, Transformer, get_model_args


def setup(quick: bool) -> dict[str, Any]:
    if quick:
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=None,
                         max_seq_len=512)  # fmt: skip
        return {
            "args": args,
            "model": "dim 64, 2 layers",
            "prompts": 2,
            "prompt_len": 64,
            "k": 16,
            "new": 8,
            "kv_gib": 0.05,
        }
    return {"args": get_model_args("tiny"), "model": "tiny (dim 256, 4 layers)", "prompts": 4, "prompt_len": 512,
            "k": 16, "new": 32, "kv_gib": 1.0}  # fmt: skip


def run_mode(args: ModelArgs, share: bool, s: dict[str, Any]) -> dict[str, Any]:
    model = Transformer(args)
    model.init_weights(0)
    model.requires_grad_(False).eval()
    engine = LLMEngine(model, EngineConfig(kv_memory_gib=s["kv_gib"], cuda_graphs=False))
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(s["prompt_len"])] for _ in range(s["prompts"])]
    k = s["k"]

    def params(n: int, seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=s["new"], temperature=1.0, n=n, seed=seed, ignore_eos=True)

    t0 = time.perf_counter()
    if share:
        out = engine.generate(prompts, [params(k, i) for i in range(len(prompts))])
    else:
        out = engine.generate(
            [p for p in prompts for _ in range(k)], [params(1, i) for i in range(len(prompts) * k)]
        )
    wall = time.perf_counter() - t0
    samples = [r for group in out for r in group]
    tokens = sum(len(r.token_ids) for r in samples)
    per_block = bytes_per_block(args.n_layers, args.n_kv_heads, args.head_dim, torch.float32)
    return {
        "provider": "llama3hp", "mode": "shared prompt (n=k)" if share else "k requests (no sharing)",
        "share": share, "responses": len(samples), "tokens": tokens, "wall_s": wall,
        "responses_per_s": len(samples) / wall, "tokens_per_s": tokens / wall,
        "kv_blocks_peak": engine.kv_blocks_peak, "kv_mib_peak": engine.kv_blocks_peak * per_block / 2**20,
        "model": s["model"], "prompts": s["prompts"], "prompt_len": s["prompt_len"], "k": k, "new_tokens": s["new"],
    }  # fmt: skip


def markdown(rows: list[dict], env: dict) -> str:
    r0 = rows[0]
    lines = header("rejection sampling: shared prompt vs k requests", env) + [
        f"Model {r0['model']} (random weights, fp32, 1 CPU thread); {r0['prompts']} prompts of {r0['prompt_len']} "
        f"tokens, k = {r0['k']} samples each, {r0['new_tokens']} new tokens per sample (temperature 1, ignore_eos).",
        "",
        "| mode | responses/s | tokens/s | wall s | peak KV blocks | peak KV MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['responses_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.2f} | "
            f"{r['kv_blocks_peak']} | {r['kv_mib_peak']:.1f} |"
        )
    on = next(r for r in rows if r["share"])
    off = next(r for r in rows if not r["share"])
    lines += [
        "",
        f"Sharing: {on['responses_per_s'] / off['responses_per_s']:.2f}x the responses/s, "
        f"{off['kv_blocks_peak'] / max(on['kv_blocks_peak'], 1):.1f}x fewer KV blocks at the peak.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    a = parse_args(argv, __doc__, reps=1)
    s = setup(a.quick)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a second OpenMP thread stalls at every tiny op's barrier on a shared machine
    try:
        rows = [run_mode(s["args"], share, s) for share in (False, True)]
    finally:
        torch.set_num_threads(before)
    return publish("rejection", rows, [], markdown, a)


if __name__ == "__main__":
    main()
