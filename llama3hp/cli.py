"""`llama3hp` command line: train, prepare, curate, evaluate, info, export, import, average, plan,
rejection-sample, generate, serve.

Every user error (`llama3hp.errors.UserError`: a bad config, data file, checkpoint or command line)
prints ONE line `error: ...` on stderr and exits with code 2. Anything else is a bug: it keeps its
traceback and exits with code 1. Heavy modules (torch, the model, the data pipeline) are imported
inside the subcommands so `llama3hp --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llama3hp.errors import UsageError, UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (its default prints the usage block too)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _cmd_train(a: argparse.Namespace) -> int:
    from llama3hp.config import build_job_config, flatten, load_job_config, parse_override
    from llama3hp.parallel import build_parallel_context
    from llama3hp.train import checkpoint as ckpt
    from llama3hp.train.checkpointer import find_latest_checkpoint
    from llama3hp.train.trainer import train

    resume = a.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        a.overrides.append(resume)  # `--resume key=value`: a bare --resume followed by an override
        resume = True
    if a.config is None:
        if not resume or resume is True:
            raise UsageError(
                "train: give --config NAME_OR_FILE (or --resume PATH to reuse a checkpoint's config)"
            )
        stored = ckpt.read_train_state(resume).get("config")
        if stored is None:
            raise UsageError(f"train: checkpoint {resume} stores no config; give --config")
        pairs = flatten(stored) + [parse_override(o) for o in a.overrides]
        job = build_job_config(pairs)
    else:
        job = load_job_config(a.config, a.overrides)
    if a.check is not None:
        return _check_layout(job, a.check)
    # Under torchrun: join the process group and build the [parallel] mesh (the batch is then
    # re-validated against the data-parallel degree); one process otherwise.
    ctx = build_parallel_context(job.parallel)
    try:
        if resume is True:
            resume = find_latest_checkpoint(job.checkpoint, job.runs_root, job.name, job.run_dir)
        train(job, resume=resume, ctx=ctx)
    finally:
        ctx.close()
    return 0


def _check_layout(job, world: int) -> int:
    """`train --check N`: the config and its layout (every curriculum stage's) on N ranks, without
    starting anything. The launch scripts run it before torchrun: a layout error is then one line
    and exit code 2, not N ranks' lines and the launcher's ChildFailedError block."""
    from llama3hp.errors import ConfigError
    from llama3hp.parallel.distributed import check_launch
    from llama3hp.parallel.mesh import resolve_dims
    from llama3hp.train.stages import check_stages

    if world < 1:
        raise UsageError(f"train: --check needs a number of ranks >= 1, got {world}")
    check_launch(job.parallel, world)
    if world > 1:
        try:
            dims = resolve_dims(job.parallel, world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_stages(job, world)
        job.validate(dp_size=dims.dp)
        print(f"config ok on {world} ranks: TP{dims.tp} CP{dims.cp} PP{dims.pp} DP{dims.dp}")
    else:
        print("config ok on one process")
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    from llama3hp.data import default_corpus_files, prepare

    if a.demo:
        from llama3hp.data.demo import build_demo

        if a.inputs:
            raise UsageError("prepare: --demo builds its rows from the stdlib; give no inputs with it")
        ms = build_demo(a.demo, a.out, workers=a.workers, overwrite=a.overwrite)
        for name, m in ms.items():
            print(f"{a.out}/{name}: {m['n_docs']:,} {a.demo} examples, {m['n_tokens']:,} tokens")
        return 0
    if a.format != "text" and not a.inputs:
        raise UsageError(
            f"prepare: --format {a.format} reads JSONL rows: give the .jsonl files (or --demo {a.format})"
        )
    inputs = [Path(p) for p in a.inputs] if a.inputs else default_corpus_files()
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise UsageError(f"prepare: input not found: {missing[0]}")
    if a.max_similarity is not None and a.format != "preference":
        raise UsageError("prepare: --max-similarity applies to --format preference")
    extra = {} if a.max_similarity is None else {"max_similarity": a.max_similarity}
    manifest = prepare(
        inputs, a.out, tokenizer_path=a.tokenizer, text_field=a.text_field, workers=a.workers, format=a.format,
        overwrite=a.overwrite, **extra,
    )  # fmt: skip
    print(
        f"prepared {len(inputs)} input(s) into {a.out}: {manifest['n_docs']:,} documents, {manifest['n_tokens']:,} tokens"
    )
    similar = manifest.get("similar_dropped")
    if similar is not None:
        print(
            f"near-identical responses (similarity >= {manifest['settings']['max_similarity']}): "
            f"{similar['pairs']:,} pairs dropped, {similar['edited']:,} edited responses dropped"
        )
    return 0


def _cmd_curate(a: argparse.Namespace) -> int:
    from llama3hp.curate import curate, format_report, load_config
    from llama3hp.data import default_corpus_files

    # One positional list: key=value items (that are not existing paths) are overrides.
    overrides = [x for x in a.items if "=" in x and not Path(x).exists()]
    inputs = [Path(x) for x in a.items if x not in overrides] or default_corpus_files()
    cfg = load_config(a.config, overrides + ([f"workers={a.workers}"] if a.workers is not None else []))
    report = curate(inputs, a.out, cfg, overwrite=a.overwrite, progress=sys.stderr.isatty())
    print(format_report(report) + f"\nwrote {a.out}/shard_*.jsonl, report.json and removed.ndjson")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from llama3hp.config import load_job_config
    from llama3hp.parallel import build_parallel_context
    from llama3hp.posttrain.evaluate import evaluate_checkpoint

    job = load_job_config(a.config, a.overrides)
    ctx = build_parallel_context(job.parallel)
    try:
        result = evaluate_checkpoint(job, a.checkpoint, ctx)
    finally:
        ctx.close()
    if ctx.is_leader:
        text = json.dumps(result, indent=1)
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from llama3hp.model import get_model_args
    from llama3hp.model.info import format_info, model_info

    if a.seq_len <= 0:
        raise UsageError(f"info: --seq-len must be positive, got {a.seq_len}")
    info = model_info(get_model_args(a.model), seq_len=a.seq_len)
    print(json.dumps(info, indent=2) if a.json else format_info(a.model, info))
    return 0


def _checkpoint_args(path: Path):
    from llama3hp.config import model_args_from_dict
    from llama3hp.train import checkpoint as ckpt

    meta = ckpt.read_train_state(path)
    if "model_args" not in meta:
        raise UsageError(f"checkpoint {path} stores no model args")
    return model_args_from_dict(meta["model_args"])


def _cmd_export(a: argparse.Namespace) -> int:
    import torch

    from llama3hp.model.convert import save_hf, save_meta
    from llama3hp.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(a.checkpoint)
    args = _checkpoint_args(path)
    sd = ckpt.load_model_state(path)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[a.dtype]
    try:
        (save_hf if a.format == "hf" else save_meta)(sd, args, a.out, dtype=dtype)
    except OSError as e:
        raise UsageError(f"export: cannot write {a.out}: {e.strerror or e}") from None
    print(f"exported {path} to {a.out} ({a.format}, {a.dtype})")
    return 0


def _cmd_import(a: argparse.Namespace) -> int:
    import dataclasses

    from llama3hp.model.convert import load_hf, load_meta
    from llama3hp.train import checkpoint as ckpt

    src = Path(a.src)
    if not src.is_dir():
        raise UsageError(f"import: source folder not found: {src}")
    args, sd = (load_hf if a.format == "hf" else load_meta)(src)
    out = ckpt.save_checkpoint(
        a.out,
        0,
        model_state={k: v.float().contiguous() for k, v in sd.items()},
        optim_state=None,
        train_state={
            "model_args": dataclasses.asdict(args),
            "imported_from": str(src.resolve()),
            "format": a.format,
        },
    )
    print(
        f"imported {src} into {out}; train from it with training.init_from={a.out} (model fields must match)"
    )
    return 0


def _cmd_average(a: argparse.Namespace) -> int:
    from llama3hp.train.average import average_checkpoints

    if a.last < 0:
        raise UsageError(f"average: --last must be >= 0, got {a.last}")
    out = average_checkpoints(a.checkpoints, a.out, last=a.last)
    print(f"averaged into {out}")
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from llama3hp.parallel.plan import main as plan_main

    return plan_main(a.plan_args)


def _passive_openmp() -> None:
    """Before torch loads: OpenMP threads that wait by sleeping, not spinning. A decode step is
    hundreds of small ops, each an OpenMP barrier; on a busy machine a spinning thread that gets
    descheduled stalls every one of them (measured on 2 shared cores: 15 -> 44 tokens/s for the tiny
    model; the same as one thread). Training keeps the default: its ops are large."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve_options(a: argparse.Namespace):
    from llama3hp.inference.build import ServeOptions

    return ServeOptions(
        checkpoint=a.checkpoint, fp8=a.fp8, dtype=a.dtype, device=a.device, tp=getattr(a, "tp", 1),
        kv_memory_gib=a.kv_memory_gib, num_blocks=a.num_blocks, max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len, cuda_graphs=not a.no_cuda_graphs,
        max_queued_requests=getattr(a, "max_queued_requests", 1024),
    ).validate()  # fmt: skip


def _cmd_rejection_sample(a: argparse.Namespace) -> int:
    from llama3hp.posttrain.rejection import RejectionConfig, rejection_sample

    cfg = RejectionConfig(
        policy=a.policy, reward=a.reward, prompts=a.prompts, out=a.out, k=a.k, temperature=a.temperature,
        top_p=a.top_p, max_tokens=a.max_tokens, system=a.system, seed=a.seed, keep_candidates=a.candidates,
        limit=a.limit, prompts_per_batch=a.prompts_per_batch, share_prompt=not a.no_share, device=a.device,
        kv_memory_gib=a.kv_memory_gib,
    )  # fmt: skip
    s = rejection_sample(cfg)
    d = s.to_dict()
    print(
        f"{s.prompts} prompts written to {a.out} ({s.skipped_done} already there, {s.skipped_empty} with only "
        f"empty samples); {s.responses} responses in {s.seconds:.1f} s ({d['responses_per_s']:.1f} responses/s, "
        f"{d['tokens_per_s']:.0f} tokens/s); mean reward: kept {s.mean_reward_best:.3f}, a random sample "
        f"{s.mean_reward_random:.3f}, all {s.mean_reward_all:.3f}",
        file=sys.stderr,
    )
    print(json.dumps(d))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    _passive_openmp()
    import time

    from llama3hp.data.tokenizer import ChatFormat, Tokenizer
    from llama3hp.inference.build import build_engine
    from llama3hp.inference.sampling import SamplingParams

    opts = _serve_options(a)
    params = SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, n=a.n,
        seed=a.seed, stop=a.stop or [],
    ).validate()  # fmt: skip
    tokenizer = Tokenizer.load()
    engine = build_engine(opts)
    prompt = (
        ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": a.prompt}])
        if a.chat
        else tokenizer.encode(a.prompt, bos=True)
    )
    engine.check_request(prompt, params)
    start = time.perf_counter()
    (samples,) = engine.generate([prompt], params, tokenizer)
    elapsed = time.perf_counter() - start
    for i, s in enumerate(samples):
        if params.n > 1:
            print(f"--- sample {i} ({s.finish_reason})")
        print(s.text if a.chat else a.prompt + s.text)
    n_tok = sum(len(s.token_ids) for s in samples)
    print(
        f"[{n_tok} tokens in {elapsed:.2f} s, {n_tok / elapsed:.1f} tokens/s; prompt {len(prompt)} tokens; "
        f"finish: {', '.join(str(s.finish_reason) for s in samples)}]",
        file=sys.stderr,
    )
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    _passive_openmp()
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs {', '.join(missing)}: pip install 'llama3hp[serve]'")
    from llama3hp.data.tokenizer import Tokenizer
    from llama3hp.inference.build import start_engine
    from llama3hp.inference.server import build_app, serve

    opts = _serve_options(a)
    tokenizer = Tokenizer.load()
    scorer = None
    if a.reward:  # checked before anything is loaded: same tokenizer and vocabulary as the policy
        from llama3hp.inference.scoring import RewardScorer
        from llama3hp.posttrain.rejection import check_pair

        check_pair(a.checkpoint, a.reward)
    engine, workers = start_engine(opts)
    if a.reward:
        scorer = RewardScorer.load(a.reward, device=engine.device, dtype=engine.cache.dtype)
    name = a.name or opts.model_name()
    args = engine.model.args
    print(
        f"serving {name} ({args.n_layers} layers, dim {args.dim}; {'FP8 FFN, ' if opts.fp8 else ''}"
        f"{engine.cache.dtype}, tp={opts.tp}, {engine.device}; KV cache {engine.scheduler.allocator.usable} "
        f"blocks of 16 tokens; context {engine.max_model_len}) on http://{a.host}:{a.port}/v1",
        flush=True,
    )
    try:
        if scorer is not None:
            print(
                f"scoring with the reward model {a.reward} at http://{a.host}:{a.port}/v1/score", flush=True
            )
        reward_name = dataclasses.replace(opts, checkpoint=a.reward).model_name() if a.reward else "reward"
        serve(build_app(engine, tokenizer, name, scorer, reward_name), a.host, a.port)
    finally:
        for p in workers:
            p.join(timeout=30)
    return 0


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a llama3hp checkpoint (step, checkpoints or run folder), a Hugging Face folder or a Meta folder")  # fmt: skip
    p.add_argument(
        "--fp8", action="store_true", help="row-wise FP8 in the feed-forward linears (the paper's recipe)"
    )
    p.add_argument(
        "--dtype", default="auto", help="weights: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--kv-memory-gib",
        type=float,
        default=None,
        help="KV cache size (default: 90%% of free GPU memory, 1 GiB on CPU)",
    )
    p.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV cache size in 16-token blocks (overrides --kv-memory-gib)",
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoding at once")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + generation (default: the model's)"
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llama3hp", description="Llama 3 trainer: train, prepare data, inspect, convert checkpoints."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser(
        "train", help="train a model", description="Train from a config with key=value overrides."
    )
    t.add_argument("--config", help="built-in config name (launch/configs/NAME.toml) or a TOML file")
    t.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.lr=1e-3"
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from a checkpoint (a step folder, a checkpoints folder or a run folder); "
        "without PATH: the latest checkpoint of run_dir / checkpoint.dir, else the newest run of this "
        "name (training.resume=auto: resume if there is one, else start)",
    )
    t.add_argument(
        "--check",
        type=int,
        metavar="NRANKS",
        help="only check the config and its parallel layout for NRANKS processes, then exit",
    )
    t.set_defaults(fn=_cmd_train)

    pr = sub.add_parser(
        "prepare", help="tokenize text into shards", description="Tokenize inputs into shards."
    )
    pr.add_argument(
        "inputs", nargs="*", help="text/JSONL files or folders (default: the Python stdlib corpus)"
    )
    pr.add_argument("--out", required=True, help="output folder (manifest.json + shards)")
    pr.add_argument(
        "--tokenizer", default=None, help="tokenizer.model path (default: the bundled Llama 3 one)"
    )
    pr.add_argument("--text-field", default="text", help="JSONL field holding the text")
    pr.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    pr.add_argument(
        "--format", default="text", choices=["text", "sft", "preference"],
        help="text documents, or JSONL chat rows: SFT conversations or preference pairs",
    )  # fmt: skip
    pr.add_argument(
        "--demo", choices=["sft", "preference"], default=None,
        help="build the stdlib demo set (functions from signature and docstring): OUT/train and OUT/heldout",
    )  # fmt: skip
    pr.add_argument(
        "--max-similarity", type=float, default=None,
        help="preference: drop pairs whose responses are at least this alike (difflib ratio of tokens; default 0.95)",
    )  # fmt: skip
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pr.set_defaults(fn=_cmd_prepare)

    ev = sub.add_parser(
        "evaluate", help="held-out metrics of a checkpoint (SFT response loss, DPO accuracy and margin)",
        description="Forward passes over posttrain.eval_datasets; prints JSON.",
    )  # fmt: skip
    ev.add_argument("--config", required=True, help="built-in config name or a TOML file")
    ev.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: training.init_from)")
    ev.add_argument("--out", default=None, help="also write the JSON here")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    ev.set_defaults(fn=_cmd_evaluate)

    cu = sub.add_parser(
        "curate",
        help="de-duplicate and filter text before prepare",
        description="URL, exact, MinHash and line de-duplication, then heuristic filters, into JSONL shards.",
    )
    cu.add_argument(
        "items",
        nargs="*",
        metavar="INPUT | key=value",
        help="text/JSONL files or folders (default: the Python stdlib corpus) and settings, "
        "e.g. minhash.threshold=0.7 lines.enabled=false",
    )
    cu.add_argument("--out", required=True, help="output folder (shard_*.jsonl, report.json, removed.ndjson)")
    cu.add_argument(
        "--config", default=None, help="TOML file of curation settings (llama3hp/curate/config.py)"
    )
    cu.add_argument(
        "--workers", type=int, default=None, help="processes (default 2; output does not depend on it)"
    )
    cu.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cu.set_defaults(fn=_cmd_curate)

    i = sub.add_parser("info", help="parameters, FLOPs and memory of a model preset")
    i.add_argument("model", help="preset name, e.g. llama3_8b")
    i.add_argument("--seq-len", type=int, default=8192, help="sequence length for FLOPs per token")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=_cmd_info)

    e = sub.add_parser("export", help="write a checkpoint's weights as Hugging Face or Meta files")
    e.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or run folder")
    e.add_argument("--format", required=True, choices=["hf", "meta"])
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    e.set_defaults(fn=_cmd_export)

    im = sub.add_parser("import", help="turn Hugging Face or Meta weights into a checkpoint to train from")
    im.add_argument("--format", required=True, choices=["hf", "meta"])
    im.add_argument(
        "--src", required=True, help="folder with config.json + safetensors (hf) or params.json + .pth (meta)"
    )
    im.add_argument("--out", required=True, help="checkpoint folder to write")
    im.set_defaults(fn=_cmd_import)

    av = sub.add_parser("average", help="average the weights of checkpoints (Polyak averaging)")
    av.add_argument(
        "checkpoints", nargs="+", help="step folders, or a checkpoints folder (expands to its steps)"
    )
    av.add_argument("--out", required=True, help="checkpoint folder to write the average into")
    av.add_argument("--last", type=int, default=0, help="with a checkpoints folder: average only its last K")
    av.set_defaults(fn=_cmd_average)

    pl = sub.add_parser(
        "plan",
        add_help=False,
        help="predict memory, step time and MFU of a parallel layout (llama3hp plan MODEL --tp ...)",
    )
    pl.add_argument("plan_args", nargs=argparse.REMAINDER)
    pl.set_defaults(fn=_cmd_plan)

    rs = sub.add_parser(
        "rejection-sample", help="k samples per prompt from a policy, the reward model keeps the best (SFT rows)",
        description="Sample k responses per prompt (the prompt's KV blocks shared), score them with a reward "
        "model, append one SFT row per prompt with the best; resumable.",
    )  # fmt: skip
    rs.add_argument("--policy", required=True, help="the policy checkpoint (a language model)")
    rs.add_argument("--reward", required=True, help="the reward model checkpoint (model.head=reward)")
    rs.add_argument("--prompts", required=True, help='JSONL rows with "prompt" or "messages" (and "id")')
    rs.add_argument("--out", required=True, help="output JSONL (appended row by row; a rerun resumes)")
    rs.add_argument("--k", type=int, default=16, help="samples per prompt, 1 to 30 (default 16)")
    rs.add_argument("--temperature", type=float, default=1.0)
    rs.add_argument("--top-p", type=float, default=1.0)
    rs.add_argument("--max-tokens", type=int, default=256, help="tokens per sample at most")
    rs.add_argument("--system", default=None, help="a system prompt before every prompt (tone, format)")
    rs.add_argument("--seed", type=int, default=0)
    rs.add_argument("--candidates", action="store_true", help="also write every sample with its score")
    rs.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    rs.add_argument("--prompts-per-batch", type=int, default=8, help="prompts sampled together")
    rs.add_argument(
        "--no-share", action="store_true", help="k requests per prompt instead of n=k (benchmark)"
    )
    rs.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    rs.add_argument("--kv-memory-gib", type=float, default=None, help="KV cache size (default 1 GiB on CPU)")
    rs.set_defaults(fn=_cmd_rejection_sample)

    g = sub.add_parser("generate", help="generate text from a checkpoint (one prompt, KV-cache engine)")
    _add_model_flags(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user turn of the Llama 3 chat format"
    )
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples of the prompt")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="a stop string (up to 4)")
    g.set_defaults(fn=_cmd_generate)

    sv = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    _add_model_flags(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one process per GPU)")
    sv.add_argument("--name", default=None, help="the model name clients ask for (default: the run's name)")
    sv.add_argument("--reward", default=None,
                    help="also serve this reward model's scores at POST /v1/score (same tokenizer as --checkpoint)")  # fmt: skip
    sv.add_argument("--max-queued-requests", type=int, default=1024, help="waiting requests before 503")
    sv.set_defaults(fn=_cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    line = " ".join(message.strip().split("\n")[0].split()) or "failed"
    print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
