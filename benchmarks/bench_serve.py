"""Serving throughput and latency: the llama3hp engine and HTTP server against Hugging Face
transformers' `generate` on the same weights, measured in the same run.

python -m benchmarks.bench_serve [--quick] [--out DIR] [--precisions bf16 fp8] [--threads N]

Rows (one JSON row each, with device, versions, date and command):
- prefill: tokens/s of prefilling a batch of prompts (ours: the engine's packed varlen prefill and
  the first token; HF: one forward over the left-padded batch);
- decode at batch 1, 8, 64: generated tokens/s after the first token (ours: continuous batching
  over the paged cache; HF: `generate` with its cache, timed by a streamer from the first token);
  with the weight bytes per token over the measured copy bandwidth as the bandwidth bound;
- target (the issue's CPU target): 32 requests of 64 new tokens, greedy, prompts of mixed lengths:
  ours (all submitted at once), HF `generate` one request at a time, HF `generate` on the whole
  left-padded batch;
- poisson: requests arriving as a Poisson process against our HTTP server (streamed through
  httpx): time to first token and inter-token latency, p50 and p99. The peer serves the same
  arrival times one request at a time with `generate` (a FIFO server without batching).
Each for every precision in --precisions (bf16; fp8 = the paper's row-wise FP8 FFN, emulated on
CPU, where it is a correctness path, not a speed one). HF runs in bf16.

--quick: the tiny preset (dim 256, 4 layers, 128K vocabulary, random weights) on CPU, 32 requests
of 64 new tokens. Full: the 8B shapes (random weights, bf16) on a GPU. Targets (never asserted):
CPU >= 2x HF sequential and >= 1.2x HF batched tokens/s; GPU FP8 prefill >= 1.3x bf16, FP8 decode
>= 1.6x bf16, batch-1 bf16 decode >= 85% of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness

NAME = "serve"
TARGETS = {"cpu_vs_hf_sequential": 2.0, "cpu_vs_hf_batched": 1.2, "fp8_prefill": 1.3, "fp8_decode": 1.6,
           "bw_bound_batch1": 0.85}  # fmt: skip


@dataclasses.dataclass
class Setup:
    quick: bool
    device: torch.device
    requests: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    prefill_batch: int
    prefill_len: int
    poisson_rate: float  # requests per second


def model_args(quick: bool):
    from llama3hp.model import get_model_args

    args = get_model_args("tiny" if quick else "llama3_8b")
    args.max_seq_len = 2048 if quick else 8192
    return args


def our_model(args, precision: str, device: torch.device, seed: int = 0):
    from llama3hp.fp8.inference import apply_fp8_inference
    from llama3hp.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.init_weights(seed)
    inv = model.inv_freq
    model = model.to(torch.bfloat16)
    model.inv_freq = inv
    model.requires_grad_(False)
    if precision == "fp8":
        apply_fp8_inference(model)
    return model.eval()


def hf_model(args, device: torch.device, seed: int = 0):
    """LlamaForCausalLM holding exactly our weights (bf16), built in memory."""
    from benchmarks.hf_peer import import_transformers
    from llama3hp.model.convert import hf_config, to_hf_state_dict

    tr = import_transformers()
    cfg = {
        k: v for k, v in hf_config(args, torch.bfloat16).items() if k not in ("architectures", "torch_dtype")
    }
    config = tr.LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    ours = our_model(args, "bf16", device, seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an 8B in fp32 would take 32 GB
    try:
        with torch.device(device):
            model = tr.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.load_state_dict(to_hf_state_dict(dict(ours.state_dict())))
    del ours
    free_memory(device)
    return model.eval().requires_grad_(False)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 120_000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# ---------------------------------------------------------------- ours


def engine_for(args, precision: str, s: Setup):
    from llama3hp.inference.engine import EngineConfig, LLMEngine

    model = our_model(args, precision, s.device)
    # A fixed KV cache (not 90% of what is free) leaves room for the next provider's model.
    cfg = EngineConfig(max_num_seqs=max(64, s.requests), max_num_batched_tokens=4096,
                       kv_memory_gib=16.0 if s.device.type == "cuda" else 1.0)  # fmt: skip
    return LLMEngine(model, cfg)


def run_engine(engine, ps: list[list[int]], new_tokens: int, device) -> dict[str, float]:
    """All prompts submitted at once, greedy, exactly new_tokens each: total and post-first-token times."""
    from llama3hp.inference.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    first_done, seen = None, set()
    while engine.has_work():
        for out in engine.step():
            seen.add(out.request_id)
        if first_done is None and len(seen) == len(ps):
            sync(device)
            first_done = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    return {"total_s": end - start, "first_s": (first_done or end) - start}


# ---------------------------------------------------------------- HF


class _Clock:
    """A `generate` streamer that notes when each step's tokens come out."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model, ps: list[list[int]], new_tokens: int, device) -> dict[str, Any]:
    """One `generate` over the left-padded batch: greedy, exactly new_tokens each."""
    L = max(len(p) for p in ps)
    ids = torch.zeros(len(ps), L, dtype=torch.long)
    mask = torch.zeros(len(ps), L, dtype=torch.long)
    for i, p in enumerate(ps):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    clock = _Clock()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)  # fmt: skip
    sync(device)
    end = time.perf_counter()
    # put() is called once with the prompt, then once per generated step
    first = clock.times[1] if len(clock.times) > 1 else end
    return {"total_s": end - start, "first_s": first - start, "times": [t - start for t in clock.times[1:]]}


def hf_prefill(model, ps: list[list[int]], device) -> float:
    L = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in ps], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps], device=device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------- the HTTP Poisson stream


def poisson_ours(
    engine, tokenizer, s: Setup, arrivals: list[float], ps: list[list[int]]
) -> dict[str, list[float]]:
    import httpx
    import uvicorn

    from llama3hp.inference.server import build_app

    app = build_app(engine, tokenizer, "bench")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    ttft: list[float] = []
    itl: list[float] = []

    async def one(client, delay: float, prompt: list[int]):
        await asyncio.sleep(delay)
        body = {
            "prompt": prompt,
            "max_tokens": s.new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        t0 = time.perf_counter()
        times = []
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        ttft.append(times[0] - t0)
        itl.extend(b - a for a, b in zip(times, times[1:]))

    async def run():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                     limits=httpx.Limits(max_connections=1000)) as client:  # fmt: skip
            await asyncio.gather(*(one(client, a, p) for a, p in zip(arrivals, ps)))

    try:
        asyncio.run(run())
    finally:
        server.should_exit = True
        th.join(timeout=30)
    return {"ttft": ttft, "itl": itl}


def poisson_hf(model, s: Setup, arrivals: list[float], ps: list[list[int]]) -> dict[str, list[float]]:
    """The same arrivals served one at a time by `generate` (a FIFO server, no batching)."""
    ttft, itl = [], []
    clock = 0.0
    for arrival, p in zip(arrivals, ps):
        start = max(clock, arrival)
        r = hf_generate(model, [p], s.new_tokens, s.device)
        ttft.append(start + r["first_s"] - arrival)
        itl.extend(b - a for a, b in zip(r["times"], r["times"][1:]))
        clock = start + r["total_s"]
    return {"ttft": ttft, "itl": itl}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    from llama3hp.inference.engine import percentile

    return percentile(values, q)


# ---------------------------------------------------------------- the run


def run(s: Setup, precisions: list[str], providers: list[str]) -> list[dict]:
    from llama3hp.data.tokenizer import Tokenizer

    args = model_args(s.quick)
    peaks = harness.measure_peaks(s.device, s.quick)
    env = harness.environment(s.device, s.quick)
    env["threads"] = torch.get_num_threads()
    shape = {"model": "tiny" if s.quick else "llama3_8b", "dim": args.dim, "layers": args.n_layers}
    rows: list[dict] = []

    def row(provider: str, mode: str, precision: str, **values) -> None:
        r = {"bench": NAME, "provider": provider, "mode": mode, "precision": precision, "shape": shape,
             "shape_str": harness.shape_str(shape), "dtype": precision, **values, **env, **peaks}  # fmt: skip
        rows.append(r)
        print(json.dumps({k: r[k] for k in r if k not in env and k not in peaks}, default=str), flush=True)

    target_ps = prompts(s.requests, 16, 128, seed=1)
    arrivals = list(_arrivals(s.requests, s.poisson_rate))
    tokenizer = Tokenizer.load()
    for precision in precisions if "llama3hp" in providers else []:
        engine = engine_for(args, precision, s)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters()) + sum(
            b.numel() * b.element_size() for n, b in engine.model.named_buffers() if n != "inv_freq"
        )
        run_engine(engine, prompts(2, 8, 8, seed=9), 4, s.device)  # warm-up (kernels, graphs)
        pre = prompts(s.prefill_batch, s.prefill_len, s.prefill_len, seed=2)
        r = run_engine(engine, pre, 1, s.device)
        row("llama3hp", "prefill", precision, tokens_per_s=s.prefill_batch * s.prefill_len / r["total_s"])
        for b in s.decode_batches:
            r = run_engine(engine, prompts(b, 32, 32, seed=3), s.new_tokens, s.device)
            tps = b * (s.new_tokens - 1) / (r["total_s"] - r["first_s"])
            bound = (
                peaks["copy_gbps"] * 1e9 / weight_bytes
            )  # tokens/s of one sequence reading every weight once
            row("llama3hp", f"decode_b{b}", precision, tokens_per_s=tps, bw_bound_tokens_per_s=bound * b,
                frac_of_bw_bound=tps / (bound * b))  # fmt: skip
        r = run_engine(engine, target_ps, s.new_tokens, s.device)
        row("llama3hp", "target", precision, tokens_per_s=s.requests * s.new_tokens / r["total_s"], **r)
        lat = poisson_ours(engine, tokenizer, s, arrivals, prompts(s.requests, 32, 96, seed=4))
        row("llama3hp", "poisson", precision, rate=s.poisson_rate, **_latency(lat))
        del engine
        free_memory(s.device)
    if "hf" in providers:
        model = hf_model(args, s.device)
        hf_generate(model, prompts(2, 8, 8, seed=9), 4, s.device)  # warm-up
        pre = prompts(s.prefill_batch, s.prefill_len, s.prefill_len, seed=2)
        row(
            "hf",
            "prefill",
            "bf16",
            tokens_per_s=s.prefill_batch * s.prefill_len / hf_prefill(model, pre, s.device),
        )
        for b in s.decode_batches:
            r = hf_generate(model, prompts(b, 32, 32, seed=3), s.new_tokens, s.device)
            row(
                "hf",
                f"decode_b{b}",
                "bf16",
                tokens_per_s=b * (s.new_tokens - 1) / (r["total_s"] - r["first_s"]),
            )
        seq = sum(hf_generate(model, [p], s.new_tokens, s.device)["total_s"] for p in target_ps)
        row("hf-sequential", "target", "bf16", tokens_per_s=s.requests * s.new_tokens / seq, total_s=seq)
        r = hf_generate(model, target_ps, s.new_tokens, s.device)
        row("hf-batched", "target", "bf16", tokens_per_s=s.requests * s.new_tokens / r["total_s"],
            total_s=r["total_s"])  # fmt: skip
        lat = poisson_hf(model, s, arrivals, prompts(s.requests, 32, 96, seed=4))
        row("hf-fifo", "poisson", "bf16", rate=s.poisson_rate, **_latency(lat))
    return rows


def _arrivals(n: int, rate: float, seed: int = 5):
    rng = random.Random(seed)
    t = 0.0
    for _ in range(n):
        yield t
        t += rng.expovariate(rate)


def _latency(lat: dict[str, list[float]]) -> dict[str, float]:
    return {"ttft_p50_ms": 1e3 * pct(lat["ttft"], 50), "ttft_p99_ms": 1e3 * pct(lat["ttft"], 99),
            "itl_p50_ms": 1e3 * pct(lat["itl"], 50), "itl_p99_ms": 1e3 * pct(lat["itl"], 99)}  # fmt: skip


def markdown(rows: list[dict], s: Setup) -> str:
    env = rows[0] if rows else {}
    get = {(r["provider"], r["mode"], r["precision"]): r for r in rows}
    lines = [
        f"# {NAME}", "",
        f"Device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}; "
        f"{env.get('date')}; {env.get('threads')} CPU threads. Command: `{env.get('command')}`", "",
        f"Model: {env.get('shape_str')} (random weights). Greedy, every request exactly {s.new_tokens} new tokens.",
        "", "| provider | precision | mode | tokens/s | % of bandwidth bound |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if "tokens_per_s" in r:
            frac = f"{100 * r['frac_of_bw_bound']:.0f}%" if "frac_of_bw_bound" in r else "-"
            lines.append(
                f"| {r['provider']} | {r['precision']} | {r['mode']} | {r['tokens_per_s']:.1f} | {frac} |"
            )
    lines += ["", f"Poisson arrivals ({s.poisson_rate} requests/s, {s.requests} requests, streamed over HTTP):", "",
              "| provider | precision | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["mode"] == "poisson":
            lines.append(f"| {r['provider']} | {r['precision']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                         f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")  # fmt: skip
    lines += [
        "",
        "Targets (measured here; never asserted):",
        "",
        "| target | ratio | goal |",
        "|---|---|---|",
    ]

    def ratio(a, b):
        ra, rb = get.get(a), get.get(b)
        return ra["tokens_per_s"] / rb["tokens_per_s"] if ra and rb else None

    checks = [
        (f"{s.requests} requests vs HF generate one at a time (bf16)",
         ratio(("llama3hp", "target", "bf16"), ("hf-sequential", "target", "bf16")), TARGETS["cpu_vs_hf_sequential"]),
        (f"{s.requests} requests vs HF generate on the whole batch (bf16)",
         ratio(("llama3hp", "target", "bf16"), ("hf-batched", "target", "bf16")), TARGETS["cpu_vs_hf_batched"]),
        ("FP8 prefill vs bf16 (GPU target)", ratio(("llama3hp", "prefill", "fp8"), ("llama3hp", "prefill", "bf16")),
         TARGETS["fp8_prefill"]),
        (f"FP8 decode vs bf16 at batch {max(s.decode_batches)} (GPU target)",
         ratio(("llama3hp", f"decode_b{max(s.decode_batches)}", "fp8"), ("llama3hp", f"decode_b{max(s.decode_batches)}", "bf16")),
         TARGETS["fp8_decode"]),
    ]  # fmt: skip
    for name, value, goal in checks:
        lines.append(f"| {name} | {'-' if value is None else f'{value:.2f}x'} | >= {goal}x |")
    b1 = get.get(("llama3hp", "decode_b1", "bf16"))
    if b1:
        lines.append(f"| batch-1 bf16 decode / bandwidth bound (GPU target) | {100 * b1['frac_of_bw_bound']:.0f}% | "
                     f">= {100 * TARGETS['bw_bound_batch1']:.0f}% |")  # fmt: skip
    if s.device.type != "cuda":
        lines += ["", "On CPU the FP8 path is the emulated GEMM (it dequantizes the weights on every call): a "
                      "correctness path, not a speed one; the FP8 and bandwidth targets are GPU targets."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="serving throughput and latency vs HF generate")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    p.add_argument("--providers", nargs="+", default=["llama3hp", "hf"], choices=["llama3hp", "hf"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (both providers)")
    a = p.parse_args(argv)
    if not a.quick and not torch.cuda.is_available():
        raise SystemExit("bench_serve: the full-size run needs a CUDA GPU; use --quick on CPU")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    s = Setup(a.quick, device, a.requests, a.new_tokens, tuple(a.decode_batches), prefill_batch=8,
              prefill_len=128 if a.quick else 1024, poisson_rate=a.rate or (4.0 if a.quick else 20.0))  # fmt: skip
    rows = run(s, a.precisions, a.providers)
    out = a.out or (Path(tempfile.mkdtemp(prefix="llama3hp-bench-")) if a.quick
                    else harness.RESULTS_DIR / harness.device_slug(device))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (out / f"{NAME}.md").write_text(markdown(rows, s))
    print(f"wrote {out / f'{NAME}.json'} and {out / f'{NAME}.md'}")
    return out


if __name__ == "__main__":
    main()
