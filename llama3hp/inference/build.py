"""From command-line options to a running engine: what `llama3hp serve` and `generate` call."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from llama3hp.errors import UsageError
from llama3hp.inference.engine import EngineConfig, LLMEngine
from llama3hp.inference.loading import DTYPES, default_device, load_serving_model


@dataclass
class ServeOptions:
    """What a user chooses when serving a checkpoint (the CLI's flags)."""

    checkpoint: str
    fp8: bool = False  # the paper's row-wise FP8 in the inner blocks' feed-forward linears
    activation_scale_ub: float = 1200.0  # bound on the per-token activation amax under --fp8
    dtype: str = "auto"  # weights: bf16 on a GPU, fp32 on CPU ("auto"), or bfloat16/float16/float32
    device: str = "auto"
    tp: int = 1
    kv_memory_gib: float | None = None
    num_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_queued_requests: int = 1024
    cuda_graphs: bool = True

    def validate(self) -> ServeOptions:
        if self.dtype not in ("auto", *DTYPES):
            raise UsageError(f"--dtype {self.dtype!r}: use auto, {', '.join(DTYPES)}")
        if self.tp < 1:
            raise UsageError(f"--tp must be >= 1, got {self.tp}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is available")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise UsageError("--max-num-seqs must be >= 1 and <= --max-num-batched-tokens")
        if not Path(self.checkpoint).exists():
            raise UsageError(f"checkpoint not found: {self.checkpoint}")
        return self

    def model_name(self) -> str:
        """The name the server answers to: the checkpoint's run (or folder) name."""
        p = Path(self.checkpoint).resolve()
        if p.name.startswith("step-") or p.name == "checkpoints":
            p = p.parent.parent if p.name.startswith("step-") and p.parent.name == "checkpoints" else p.parent
        return p.name


def build_engine(opts: ServeOptions, group: dist.ProcessGroup | None = None, rank: int = 0) -> LLMEngine:
    """Load the checkpoint (this rank's shards under `group`) and build the engine over it."""
    if opts.device == "auto":
        device = default_device()
    else:
        device = torch.device(opts.device)
    if group is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = None if opts.dtype == "auto" else DTYPES[opts.dtype]
    model = load_serving_model(
        opts.checkpoint, device=device, dtype=dtype, fp8=opts.fp8,
        activation_scale_ub=opts.activation_scale_ub, group=group,
    )  # fmt: skip
    cfg = EngineConfig(
        max_num_seqs=opts.max_num_seqs, max_num_batched_tokens=opts.max_num_batched_tokens,
        kv_memory_gib=opts.kv_memory_gib, num_blocks=opts.num_blocks, max_model_len=opts.max_model_len,
        max_queued_requests=opts.max_queued_requests, cuda_graphs=opts.cuda_graphs,
    )  # fmt: skip
    return LLMEngine(model, cfg, group=group)


def start_engine(opts: ServeOptions) -> tuple[LLMEngine, list]:
    """The engine on this process; with --tp N also the N-1 worker ranks (returned processes)."""
    if opts.tp == 1:
        return build_engine(opts), []
    from llama3hp.inference.tp import start_group

    group, procs = start_group(opts.tp, functools.partial(build_engine, opts))
    return build_engine(opts, group, 0), procs
