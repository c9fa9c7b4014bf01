"""Build-time work of a run: device and precision, the data loader, the model (with FP8 and its
parallel layout), the optimizer and the run folder. The trainer calls these in order, once.

Model order (the same on one process and on a mesh):
1. the model on the meta device (no memory). On one process it is materialised with `to_empty` +
   `init_weights(seed)` before FP8; on a mesh each rank materialises only the shards it keeps
   inside `parallelize` (the per-parameter generators of `init_parameter` make them equal to the
   slices of the whole model, whatever the layout);
2. FP8 (`job.fp8`, off by default): `llama3hp.fp8.apply_fp8` swaps the block linears for FP8 ones
   from outside the model (see `build_model` for why exactly there);
3. `parallelize`: TP/SP and CP, the pipeline split, activation checkpointing and ZeRO data
   parallelism applied from outside (`llama3hp.parallel.parallelize`), returning the step interface
   (`StepModel`) the trainer drives, whatever the layout.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from llama3hp.errors import ConfigError, UserError
from llama3hp.parallel.distributed import ParallelContext
from llama3hp.parallel.step_model import StepModel

if TYPE_CHECKING:
    from llama3hp.config import JobConfig

STDLIB_CORPUS = "@stdlib"  # a data.datasets entry meaning "the stdlib corpus, prepared on first use"


# ---------------------------------------------------------------------------------------------
# Device and precision


def select_device(name: str, ctx: ParallelContext | None = None) -> torch.device:
    """training.device resolved ("auto": CUDA when there is one); a mesh rank's own GPU on CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "training.device=cuda but no CUDA device is available: use training.device=cpu or auto"
        )
    if name == "cuda" and ctx is not None and ctx.mesh is not None:
        return ctx.mesh.device  # LOCAL_RANK's GPU
    return torch.device(name)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32): bf16 on CUDA by default, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if dtype == "bfloat16" else None


def tune_cpu_allocator() -> None:
    """Keep large freed blocks in the glibc heap instead of returning them to the OS.

    A CPU step allocates and frees the [tokens, 128256] fp32 logits and their gradient (262 MB
    each at 512 tokens) plus dense embedding/head gradients; by default glibc serves each with
    mmap and unmaps it on free, so every step page-faults ~1 GB afresh. Raising the mmap and trim
    thresholds measured 1.7 s -> 0.95 s per tiny-model step on 2 cores. No-op without glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the defaults
        pass


def setup_device(device: torch.device) -> None:
    """TF32 for the fp32 matmuls left outside autocast on CUDA; the allocator tuning on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        tune_cpu_allocator()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Checks that need the device or the layout (the config's own checks run when it is loaded)


def check_layout(job: JobConfig, ctx: ParallelContext) -> None:
    """One-line ConfigError for a batch or model the mesh cannot split, at every stage of the
    sequence-length curriculum (each with its own context-parallel degree, `stages.py`)."""
    if ctx.mesh is None:
        return
    from llama3hp.train.stages import check_stages

    check_stages(job, ctx.world_size)


def check_fp8(job: JobConfig, ctx: ParallelContext, device: torch.device) -> None:
    """One-line ConfigError for an FP8 recipe this device or layout cannot run."""
    if not job.fp8.enabled:
        return
    try:
        job.fp8.check_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ctx.mesh is not None and job.fp8.uses_te:
        # The parallel blocks (llama3hp.parallel.tensor) drive TP/SP communication themselves and call
        # the native Fp8Linear modules; TE's Linear would do its own, and TE is on no machine here
        # to test the pairing against.
        raise ConfigError(
            f"fp8.recipe={job.fp8.recipe} on a {ctx.world_size}-rank mesh: Transformer Engine recipes run on "
            "one process only; use fp8.recipe=rowwise (TP/CP/PP/DP-aware) on a mesh"
        )


def check_precision(job: JobConfig, amp: torch.dtype | None) -> None:
    if job.parallel.zero3_gather_dtype == "bfloat16" and amp != torch.bfloat16:
        raise ConfigError(
            "parallel.zero3_gather_dtype=bfloat16 rounds the weights the GEMMs read, which only bf16 "
            "autocast does anyway: set training.dtype=bfloat16 or zero3_gather_dtype=float32"
        )


# ---------------------------------------------------------------------------------------------
# Data


def resolve_datasets(job: JobConfig, tokenizer: Any) -> list[str]:
    """data.datasets with '@stdlib' replaced by the stdlib corpus, prepared once into
    <data_cache>/stdlib-<tokenizer sha prefix>/ and reused afterwards."""
    out = []
    for entry in job.data.datasets:
        name, sep, weight = (
            entry.rpartition(":") if entry.startswith(STDLIB_CORPUS + ":") else (entry, "", "")
        )
        if name != STDLIB_CORPUS:
            out.append(entry)
            continue
        folder = Path(job.data_cache) / f"stdlib-{tokenizer.sha256[:12]}"
        if not (folder / "manifest.json").is_file():
            from llama3hp.data import default_corpus_files, prepare

            print(f"preparing the stdlib corpus into {folder} (once)", flush=True)
            prepare(default_corpus_files(), folder, tokenizer_path=job.data.tokenizer_path)
        out.append(str(folder) + (sep + weight if sep else ""))
    return out


def build_loader(job: JobConfig, ctx: ParallelContext) -> tuple[Any, Any]:
    """(tokenizer, this DP rank's loader). Rank 0 prepares the stdlib corpus when it is missing;
    the other ranks wait for its folder names. One-line error when the data's token ids do not fit
    the model's vocabulary."""
    from llama3hp.data import Tokenizer
    from llama3hp.data import build_loader as build_data_loader

    tokenizer = Tokenizer.load(job.data.tokenizer_path)
    datasets = resolve_datasets(job, tokenizer) if ctx.is_leader else None
    data_cfg = dataclasses.replace(job.data, datasets=ctx.broadcast(datasets))
    loader = build_data_loader(
        data_cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, tokenizer_sha256=tokenizer.sha256,
        ranked=job.posttrain.objective == "reward",
    )  # fmt: skip
    vocab = max(ds.vocab_size for ds in loader.datasets)
    if vocab > job.model.vocab_size:
        raise ConfigError(
            f"the datasets hold token ids up to {vocab - 1} but model.vocab_size is {job.model.vocab_size}: "
            "raise model.vocab_size or use data prepared with a smaller tokenizer"
        )
    return tokenizer, loader


# ---------------------------------------------------------------------------------------------
# Model and optimizer


def apply_fp8_layers(model: torch.nn.Module, job: JobConfig, tp_size: int = 1) -> list[str]:
    """Converts the block linears chosen by job.fp8 (none when fp8.recipe="none"); returns their FQNs.

    TE recipes also wrap the model's forward in te_autocast with the recipe built from job.fp8
    (forward hooks installed by `llama3hp.fp8.te.apply_te`). `tp_size`: the shards' dims decide
    which linears the row-wise GEMM can take.
    """
    if not job.fp8.enabled:
        return []
    from llama3hp.fp8 import apply_fp8

    return apply_fp8(model, job.fp8, tp_size=tp_size)


def build_model(
    job: JobConfig, device: torch.device, ctx: ParallelContext, amp_dtype: torch.dtype | None = None
) -> StepModel:
    """This rank's StepModel: the plain model on one process, its ParallelModel on a mesh, with the
    blocks chosen by training.activation_checkpointing checkpointed."""
    from llama3hp.model import Transformer
    from llama3hp.parallel import parallelize

    t = job.training
    ac_every = t.activation_checkpointing_every if t.activation_checkpointing == "full" else None
    with torch.device("meta"):
        model = Transformer(job.model)
    if ctx.mesh is not None:
        # Each rank materialises only the shards it keeps, with the values whole-then-shard would
        # give (init is seeded per parameter): host memory is one parameter at a time, not the whole
        # model. The native FP8 linears share their meta Parameters, so converting first is free, and
        # tensor parallelism then shards their weights and calls them (check_fp8 refuses TE here).
        apply_fp8_layers(model, job, tp_size=ctx.mesh.dims.tp)
        return parallelize(
            model, ctx.mesh, job.parallel, init_seed=t.seed, ac_every=ac_every, amp_dtype=amp_dtype
        )
    model.to_empty(device=device)
    model.init_weights(seed=t.seed)
    # FP8 after materialising and before parallelism. After: TE recipes copy the initialised
    # weights into their own modules (Fp8Linear shares the Parameters, so it would not care), and
    # the weights are then the same whatever the recipe. Before: tensor parallelism shards the
    # weights of the modules it finds, compile would trace the modules as they will run, and ZeRO
    # flattens the parameters the optimizer will own; each must see the final FP8 modules, and a
    # TE Linear swapped in after ZeRO would hold parameters no optimizer updates.
    apply_fp8_layers(model, job)
    return parallelize(model, None, job.parallel, ac_every=ac_every, amp_dtype=amp_dtype)


def build_optimizer(model: StepModel, t: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (decay for matrices, none for norms; on a mesh the
    fp32 ZeRO shards): fused on CUDA, foreach on CPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        model.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
        fused=fused or None, foreach=None if fused else True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Run folder


def new_run_dir(job: JobConfig) -> Path:
    if job.run_dir:
        return Path(job.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(job.runs_root) / f"{job.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def pick_run_dir(job: JobConfig, resume_path: Path | None) -> Path:
    """Resuming from <run>/checkpoints/step-N continues that run's folder (metrics append)."""
    if resume_path is not None and not job.run_dir and resume_path.parent.name == "checkpoints":
        return resume_path.parent.parent
    return new_run_dir(job)


def resolve_resume(job: JobConfig, resume: str | Path | None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to continue or None) for `resume` (the CLI's, else training.resume):
    "" or "none" starts fresh; "auto" continues the latest complete checkpoint of the run's own
    checkpoint folder when there is one (run folder: run_dir, else <runs_root>/<name>, the same on
    every restart), else starts there; anything else is a checkpoint path."""
    from llama3hp.train import checkpoint as ckpt
    from llama3hp.train.checkpointer import latest_complete

    mode = str(job.training.resume if resume is None else resume)
    if mode in ("", "none"):
        return new_run_dir(job), None
    if mode == "auto":
        run_dir = Path(job.run_dir) if job.run_dir else Path(job.runs_root) / job.name
        folder = Path(job.checkpoint.dir) if job.checkpoint.dir else run_dir / "checkpoints"
        return run_dir, latest_complete(folder)
    path = ckpt.resolve_checkpoint(mode)
    return pick_run_dir(job, path), path


def prepare_run(
    job: JobConfig, ctx: ParallelContext, resume: str | Path | None
) -> tuple[Path, Path, Path | None]:
    """(run folder, checkpoint folder, checkpoint to resume) decided on rank 0 and shared, after
    checking that both folders are writable (every rank probes the checkpoint folder it will write
    shards into) and that the checkpoint to resume is complete: before any minute of work."""
    from llama3hp.train import checkpoint as ckpt
    from llama3hp.train.checkpointer import check_writable

    err, decided = None, None
    if ctx.is_leader:
        try:
            run_dir, path = resolve_resume(job, resume)
            decided = (str(run_dir), str(path) if path is not None else None)
        except UserError as e:
            err = str(e)
    box = ctx.broadcast((err, decided))
    if box[0] is not None:
        raise ckpt.CheckpointError(box[0])
    run_dir, path = Path(box[1][0]), (Path(box[1][1]) if box[1][1] is not None else None)
    ckpt_dir = Path(job.checkpoint.dir) if job.checkpoint.dir else run_dir / "checkpoints"
    errors = [check_writable(run_dir, "run folder") if ctx.is_leader else None]
    from llama3hp.train.stages import has_stage_layouts

    if job.checkpoint.enabled or (ctx.mesh is not None and has_stage_layouts(job)):  # a re-plan saves
        errors.append(check_writable(ckpt_dir, "checkpoint folder", ctx.rank))
    mine = next((e for e in errors if e), None)
    if ctx.group is not None:
        every: list[str | None] = [None] * ctx.world_size
        dist.all_gather_object(every, mine, group=ctx.group)
        mine = next((e for e in every if e), None)
    if mine is not None:
        raise ConfigError(mine)
    if path is not None:
        ckpt.verify_checkpoint_shared(path, ctx.group)
    return run_dir, ckpt_dir, path
