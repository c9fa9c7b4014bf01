"""The pre-training loop.

Order of construction (the same on one process and on a mesh):
1. the model on the meta device (no memory). On one process it is materialised with `to_empty` +
   `init_weights(seed)`, then FP8 (`job.fp8`, off by default): `llama3hp.fp8.apply_fp8` swaps the
   block linears for FP8 ones from outside the model (see `build_model` for why exactly there).
   On a mesh each rank materialises only the shards it keeps; the per-parameter generators of
   `init_weights` make them equal to the slices of the whole model, whatever the layout;
2. `apply_parallelism(model, ctx, cfg)`: TP/SP and CP, the pipeline split and ZeRO data
   parallelism applied from outside the model (`llama3hp.parallel.parallelize`; the plain model on
   one process);
3. AdamW over the (possibly sharded) parameters; the loader for this rank's (dp_rank, dp_size): all
   TP/CP/PP ranks of one DP replica read the same rows.

On a mesh (torchrun with WORLD_SIZE > 1: `build_parallel_context`) rank 0 alone creates the run
folder and writes config.json, metrics.jsonl, loss.png, the progress bar and the summary; every
rank writes its checkpoint shards (`checkpoint.save_sharded_checkpoint`).

Each optimizer step takes `global_rows / (micro_rows * dp)` micro-batches; every micro-batch's
loss is computed with reduction="sum" and divided by the global count of target tokens, so the
accumulated gradient equals the gradient of the mean loss over the whole batch exactly.
The batch size, sequence length and learning rate are functions of (step, tokens seen)
(`schedules.py`), and step, tokens, loader and RNG states are checkpointed, so `--resume`
continues bit-exactly on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from llama3hp.config import STDLIB_CORPUS, ConfigError, JobConfig, dump_job_config, job_to_dict, validate
from llama3hp.parallel.mesh import DeviceMesh4D, ParallelConfig
from llama3hp.train import checkpoint as ckpt
from llama3hp.train import metrics as M
from llama3hp.train.schedules import LRSchedule, batch_rows_at, lr_at, plan_tokens, seq_len_at

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the job: one process (no mesh), or a rank of a 4D mesh."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    mesh: DeviceMesh4D | None = None

    @property
    def is_leader(self) -> bool:
        """Global rank 0: the one rank that writes run-level files."""
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """All ranks of the layout (None on one process)."""
        return self.mesh.world_group if self.mesh is not None else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank of the layout."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]


def context_from_mesh(mesh: DeviceMesh4D | None) -> ParallelContext:
    if mesh is None or mesh.dims.world_size == 1:
        return ParallelContext()
    return ParallelContext(mesh.rank, mesh.dims.world_size, mesh.dp_rank, mesh.dims.dp, mesh)


def build_parallel_context(job: JobConfig) -> ParallelContext:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and build the mesh of job.parallel;
    one process without WORLD_SIZE. Every rank must be part of the layout."""
    from llama3hp.parallel import build_mesh, init_distributed

    _, world = init_distributed()
    if world == 1:
        return ParallelContext()
    try:
        mesh = build_mesh(job.parallel)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mesh is None or mesh.dims.world_size != world:
        n = world if mesh is None else mesh.dims.world_size
        raise ConfigError(
            f"the [parallel] layout uses fewer ranks than the {world} launched ({n}): set parallel.dp=-1 "
            "or launch tp*cp*pp*dp processes"
        )
    return context_from_mesh(mesh)


def apply_parallelism(
    model: torch.nn.Module, ctx: ParallelContext, cfg: ParallelConfig, *, init_seed: int | None = None
):
    """TP/SP and CP, the pipeline split, then ZeRO data parallelism (see parallel/parallelize.py for
    why in that order): a ParallelModel on a mesh, the model as is on one process. A meta-device
    model with init_seed is materialised shard by shard on its rank."""
    if ctx.mesh is None:
        if ctx.world_size != 1:
            raise ConfigError(
                f"WORLD_SIZE={ctx.world_size} but no device mesh: build the context with a mesh"
            )
        return model
    from llama3hp.parallel import parallelize

    return parallelize(model, ctx.mesh, cfg, init_seed=init_seed)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "training.device=cuda but no CUDA device is available: use training.device=cpu or auto"
        )
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, t: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on norms and biases (1-D parameters). fused on CUDA, foreach on CPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(("norm.weight", ".bias")) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=fused or None, foreach=None if fused else True
    )


def build_model(job: JobConfig, device: torch.device, ctx: ParallelContext):
    """The plain model on one process; this rank's ParallelModel on a mesh; with the blocks chosen by
    training.activation_checkpointing checkpointed."""
    from llama3hp.model.llama import set_activation_checkpointing

    built = _build_model(job, device, ctx)
    t = job.training
    every = t.activation_checkpointing_every if t.activation_checkpointing == "full" else None
    set_activation_checkpointing(built.chunks if ctx.mesh is not None else built, every)
    return built


def _build_model(job: JobConfig, device: torch.device, ctx: ParallelContext):
    from llama3hp.model import Transformer

    with torch.device("meta"):
        model = Transformer(job.model)
    if ctx.mesh is not None:
        # Each rank materialises only the shards it keeps, with the values whole-then-shard would
        # give (init is seeded per parameter): host memory is one parameter at a time, not the whole
        # model. The native FP8 linears share their meta Parameters, so converting first is free, and
        # tensor parallelism then shards their weights and calls them (check_fp8 refuses TE here).
        apply_fp8_layers(model, job, tp_size=ctx.mesh.dims.tp)
        return apply_parallelism(model, ctx, job.parallel, init_seed=job.training.seed)
    model.to_empty(device=device)
    model.init_weights(seed=job.training.seed)
    # FP8 after materialising and before parallelism. After: TE recipes copy the initialised
    # weights into their own modules (Fp8Linear shares the Parameters, so it would not care), and
    # the weights are then the same whatever the recipe. Before: tensor parallelism shards the
    # weights of the modules it finds, compile would trace the modules as they will run, and ZeRO
    # flattens the parameters the optimizer will own; each must see the final FP8 modules, and a
    # TE Linear swapped in after ZeRO would hold parameters no optimizer updates.
    apply_fp8_layers(model, job)
    return apply_parallelism(model, ctx, job.parallel)


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


def fp8_linear_fqns(built: Any, ctx: ParallelContext) -> list[str]:
    """FQNs of the whole model's FP8 linears (every pipeline stage's, the same list on every rank)."""
    from llama3hp.fp8 import fp8_linear_names

    if ctx.mesh is None:
        return fp8_linear_names(built)
    mine = sorted({name for chunk in built.chunks for name in fp8_linear_names(chunk)})
    pp_group = ctx.mesh.pp_group
    if pp_group is None:
        return mine
    parts: list[list[str]] = [[] for _ in range(ctx.mesh.dims.pp)]
    dist.all_gather_object(parts, mine, group=pp_group)
    return sorted({name for part in parts for name in part})


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


def build_sharded_optimizer(pm: Any, t: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over a ParallelModel's fp32 shards (decay for matrices, none for norms)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        pm.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
        fused=fused or None, foreach=None if fused else True,
    )  # fmt: skip


def check_layout(job: JobConfig, ctx: ParallelContext) -> None:
    """One-line ConfigError for a batch or model the mesh cannot split."""
    if ctx.mesh is None:
        return
    from llama3hp.parallel import validate_layout

    t = job.training
    validate(job, dp_size=ctx.dp_size)
    try:
        for seq in {t.seq_len, *(s for _, s in t.seq_len_stages)}:
            validate_layout(job.parallel, ctx.mesh.dims, job.model, seq)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def dataset_vocab_size(loader: Any) -> int:
    """The largest vocabulary the loader's datasets were prepared with (token ids are below it)."""
    return max(ds.vocab_size for ds in loader.datasets)


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


def new_run_dir(job: JobConfig) -> Path:
    if job.run_dir:
        return Path(job.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(job.runs_root) / f"{job.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def find_latest_checkpoint(job: JobConfig) -> Path:
    """For a bare --resume: checkpoint.dir if set, else the newest run of this name with a checkpoint."""
    if job.checkpoint.dir:
        return ckpt.resolve_checkpoint(job.checkpoint.dir)
    runs = sorted(
        Path(job.runs_root).glob(f"{job.name}-*/checkpoints/{ckpt.LATEST}"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ckpt.CheckpointError(
            f"nothing to resume: no checkpoint under {job.runs_root}/{job.name}-*/checkpoints; pass --resume PATH"
        )
    return ckpt.resolve_checkpoint(runs[-1].parent)


@dataclass
class TrainResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows of this invocation
    wall_s: float = 0.0
    last_checkpoint: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]


class Trainer:
    """Builds everything from a JobConfig and runs the loop (`run`)."""

    def __init__(
        self, job: JobConfig, *, ctx: ParallelContext | None = None, resume: str | Path | None = None
    ):
        self.job = job
        self.ctx = ctx or ParallelContext()
        check_layout(job, self.ctx)
        # Fail on a bad checkpoint path before the minutes of building data and model.
        resume_path = ckpt.resolve_checkpoint(resume) if resume else None
        if resume_path is not None:
            ckpt.verify_checkpoint_shared(resume_path, self.ctx.group)
        self.device = select_device(job.training.device)
        if self.ctx.mesh is not None and self.device.type == "cuda":
            self.device = self.ctx.mesh.device  # the rank's own GPU (LOCAL_RANK)
        self.amp_dtype = autocast_dtype(job.training.dtype, self.device)
        if job.parallel.zero3_gather_dtype == "bfloat16" and self.amp_dtype != torch.bfloat16:
            raise ConfigError(
                "parallel.zero3_gather_dtype=bfloat16 rounds the weights the GEMMs read, which only bf16 "
                "autocast does anyway: set training.dtype=bfloat16 or zero3_gather_dtype=float32"
            )
        check_fp8(job, self.ctx, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain (outside autocast)
            torch.backends.cudnn.allow_tf32 = True
        else:
            tune_cpu_allocator()
        seed_everything(job.training.seed)

        from llama3hp.data import Tokenizer, build_loader

        self.tokenizer = Tokenizer.load(job.data.tokenizer_path)
        datasets = resolve_datasets(job, self.tokenizer) if self.ctx.is_leader else None
        # Rank 0 prepares the stdlib corpus when missing; the others wait for its folder names.
        data_cfg = dataclasses.replace(job.data, datasets=self.ctx.broadcast(datasets))
        self.loader = build_loader(
            data_cfg,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size,
            tokenizer_sha256=self.tokenizer.sha256,
        )
        vocab = dataset_vocab_size(self.loader)
        if vocab > job.model.vocab_size:
            raise ConfigError(
                f"the datasets hold token ids up to {vocab - 1} but model.vocab_size is {job.model.vocab_size}: "
                "raise model.vocab_size or use data prepared with a smaller tokenizer"
            )
        built = build_model(job, self.device, self.ctx)
        self.pm = built if self.ctx.mesh is not None else None  # ParallelModel on a mesh
        self.model = None if self.pm is not None else built
        self.fp8_fqns = fp8_linear_fqns(built, self.ctx) if job.fp8.enabled else []
        if self.pm is not None:
            self.optimizer = build_sharded_optimizer(self.pm, job.training, self.device)
        else:
            self.optimizer = build_optimizer(self.model, job.training, self.device)

        self.step = 0
        self.tokens_seen = 0
        if resume_path is not None:
            self._resume(resume_path)
        elif job.training.init_from:
            if self.pm is not None:
                ckpt.load_sharded_checkpoint(job.training.init_from, self.pm, None, group=self.ctx.group)
            else:
                ckpt.load_checkpoint(job.training.init_from, self.model, None)
        if self.step >= job.training.steps:
            raise ConfigError(
                f"checkpoint is at step {self.step}, already >= training.steps={job.training.steps}: "
                "raise training.steps to continue"
            )
        self.run_dir = Path(
            self.ctx.broadcast(str(self._pick_run_dir(resume_path)) if self.ctx.is_leader else None)
        )
        self.ckpt_dir = Path(job.checkpoint.dir) if job.checkpoint.dir else self.run_dir / "checkpoints"
        t = job.training
        self.schedule = LRSchedule(
            lr=t.lr,
            total_steps=t.steps,
            warmup_steps=t.warmup_steps,
            min_lr_ratio=t.min_lr_ratio,
            anneal_steps=t.anneal_steps,
            anneal_tokens=t.anneal_tokens,
            # Walking 1M+ steps costs a second or two: only when a token-based anneal needs it.
            total_tokens=plan_tokens(t.steps, t.global_batch_rows, t.seq_len, t.batch_ramp, t.seq_len_stages)
            if t.anneal_tokens
            else 0,
        )

    def _resume(self, path: Path) -> None:
        if self.pm is not None:  # any layout's checkpoint (or one process's) into this rank's shards
            state = ckpt.load_sharded_checkpoint(
                path, self.pm, self.optimizer, group=self.ctx.group, verify=False
            )  # verified in __init__
        else:
            state = ckpt.load_checkpoint(path, self.model, self.optimizer, verify=False)
        if state.get("kind") != "full":  # weights only (import / average): a fresh run from them
            return
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        rng = ckpt.read_rng_state(path)
        if rng is not None:
            ckpt.set_rng_state(rng)

    def _pick_run_dir(self, resume_path: Path | None) -> Path:
        # Resuming from <run>/checkpoints/step-N continues that run's folder (metrics append).
        if resume_path is not None and not self.job.run_dir and resume_path.parent.name == "checkpoints":
            return resume_path.parent.parent
        return new_run_dir(self.job)

    # ------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics row (without timing)."""
        t = self.job.training
        rows = batch_rows_at(t.batch_ramp, self.tokens_seen, t.global_batch_rows)
        seq_len = seq_len_at(t.seq_len_stages, self.tokens_seen, t.seq_len)
        accum = t.grad_accum_steps(rows, self.ctx.dp_size)
        batches = [self.loader.next_batch(t.micro_batch_rows, seq_len).to(self.device) for _ in range(accum)]
        if self.pm is not None:
            loss, grad_norm, doc_lens = self._mesh_step(batches)
        else:
            loss, grad_norm, doc_lens = self._local_step(batches)
        lr = lr_at(self.schedule, self.step, self.tokens_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.pm is not None:
            self.pm.after_optimizer_step()
            self.pm.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        tokens = rows * seq_len
        self.step += 1
        self.tokens_seen += tokens
        return {
            "step": self.step,
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "tokens": tokens,
            "tokens_seen": self.tokens_seen,
            "global_batch_rows": rows,
            "seq_len": seq_len,
            "grad_accum": accum,
            "_doc_lens": doc_lens,
        }

    def _mesh_step(self, batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Forward and backward of the step's micro-batches through the mesh; the clipped global norm."""
        from llama3hp.parallel import MicroBatch

        t = self.job.training
        mbs = [MicroBatch(b.inputs, b.targets, b.cu_seqlens, b.max_seqlen) for b in batches]
        with self._autocast():
            loss = self.pm.forward_backward(mbs, z_loss_scale=t.z_loss_scale)
        grad_norm = self.pm.clip_grad_norm_(t.grad_clip)
        doc_lens = [n for b in batches for n in M.doc_lengths(b.cu_seqlens)]
        return loss, grad_norm, doc_lens

    def _local_step(self, batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Forward and backward of the step's micro-batches on one process; the clipped norm."""
        t = self.job.training
        n_targets = sum((b.targets != IGNORE_INDEX).sum() for b in batches).to(torch.float32)
        n_targets = n_targets.clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        doc_lens: list[int] = []
        for b in batches:
            with self._autocast():
                loss = self.model(
                    b.inputs,
                    targets=b.targets,
                    cu_seqlens=b.cu_seqlens,
                    max_seqlen=b.max_seqlen,
                    reduction="sum",
                    z_loss_scale=t.z_loss_scale,
                )
            (loss / n_targets).backward()
            loss_sum += loss.detach()
            doc_lens += M.doc_lengths(b.cu_seqlens)
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return loss_sum / n_targets, grad_norm, doc_lens

    def save(self) -> Path:
        train_state = {
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "schedule": {
                "lr": lr_at(self.schedule, self.step, self.tokens_seen),
                **dataclasses.asdict(self.schedule),
            },
            "config": job_to_dict(self.job),
            "model_args": dataclasses.asdict(self.job.model),
            "run_dir": str(self.run_dir),
            "parallel": dataclasses.asdict(self.ctx.mesh.dims) if self.ctx.mesh is not None else None,
        }
        if self.pm is not None:  # every rank its shards; the loader position is global: rank 0's
            return ckpt.save_sharded_checkpoint(
                self.ckpt_dir, self.step, self.pm, self.optimizer, group=self.ctx.group,
                train_state=train_state, rng=ckpt.rng_state(), keep=self.job.checkpoint.keep,
            )  # fmt: skip
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return ckpt.save_checkpoint(
            self.ckpt_dir,
            self.step,
            model_state=model_sd,
            optim_state=optim_sd,
            train_state=train_state,
            rng=ckpt.rng_state(),
            keep=self.job.checkpoint.keep,
        )

    def run(self) -> TrainResult:
        from llama3hp.model.flops import flops_per_token

        job, t, mc = self.job, self.job.training, self.job.metrics
        lead = self.ctx.is_leader  # run-level files, bar and summary on global rank 0 only
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_job_config(job, self.run_dir / "config.json")
        peak, peak_measured = M.peak_flops(self.device, mc.peak_flops) if lead else (1.0, False)
        fp8_fpt = 0.0
        if self.fp8_fqns:
            from llama3hp.fp8 import fp8_flops_per_token

            fp8_fpt = fp8_flops_per_token(job.model, fqns=self.fp8_fqns)
        logger = M.MetricsLogger(self.run_dir, jsonl=mc.jsonl and lead, tensorboard=mc.tensorboard and lead)
        telemetry = M.GpuTelemetry(self.device) if mc.gpu_telemetry and lead else None
        result = TrainResult(run_dir=self.run_dir)
        from tqdm import tqdm

        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (mc.progress and lead),
            unit="step",
            dynamic_ncols=True,
        )
        profiler = None
        start = time.perf_counter()
        try:
            while self.step < t.steps:
                if lead and mc.profile_steps and self.step == mc.profile_steps[0]:
                    profiler = self._start_profiler()
                t0 = time.perf_counter()
                row = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                doc_lens = row.pop("_doc_lens")
                tok_s = row["tokens"] / dt
                fpt = flops_per_token(job.model, row["seq_len"], doc_lens)
                if peak_measured:  # see metrics.py: the measured peak is a lower bound
                    peak = max(peak, tok_s * fpt / self.ctx.world_size)
                row.update(
                    step_time_s=dt,
                    tokens_per_s=tok_s,
                    flops_per_token=fpt,
                    mfu=M.mfu(tok_s, fpt, peak, self.ctx.world_size),
                    peak_mem_gib=M.peak_memory_bytes(self.device) / 1024**3,
                )
                if job.fp8.enabled:
                    # On CPU the FP8 peak follows the measured one (emulated GEMMs): read it each step.
                    peak8, note = M.fp8_peak_flops(self.device, peak, mc.peak_fp8_flops)
                    row["fp8_recipe"] = job.fp8.recipe
                    row.update(M.fp8_fields(tok_s, fpt, fp8_fpt, peak, peak8, self.ctx.world_size, note))
                if telemetry is not None:
                    row.update(telemetry.read())
                result.rows.append(row)
                if lead and (self.step % mc.log_interval == 0 or self.step == t.steps):
                    logger.log(row)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * row['mfu']:.2f}%"
                )
                if profiler is not None and self.step == mc.profile_steps[1]:
                    self._stop_profiler(profiler)
                    profiler = None
                c = job.checkpoint
                if c.enabled and (
                    (c.interval and self.step % c.interval == 0) or (c.save_final and self.step == t.steps)
                ):
                    result.last_checkpoint = self.save()
        finally:
            bar.close()
            if profiler is not None:
                self._stop_profiler(profiler)
            logger.close()
        result.wall_s = time.perf_counter() - start
        if lead and mc.plot and mc.jsonl and logger.path and logger.path.is_file():
            M.plot_loss(M.read_jsonl(logger.path), self.run_dir / "loss.png")
        if lead:
            print(M.format_summary(result.rows, result.wall_s), flush=True)
        return result

    def _start_profiler(self):
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts, record_shapes=True)
        prof.__enter__()
        prof._llama3hp_start = self.step
        return prof

    def _stop_profiler(self, prof) -> None:
        prof.__exit__(None, None, None)
        path = self.run_dir / f"trace-steps-{prof._llama3hp_start}-{self.step}.json"
        tmp = path.with_name(path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)


def train(
    job: JobConfig, *, resume: str | Path | None = None, ctx: ParallelContext | None = None
) -> TrainResult:
    """Build a Trainer from `job` and run it."""
    return Trainer(job, ctx=ctx, resume=resume).run()
