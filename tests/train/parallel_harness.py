"""The real `Trainer` on spawned gloo ranks: ONE group of `world` ranks runs every case in turn.

A case is a list of job overrides (its layout in `parallel.*`), an optional checkpoint to resume
from, and a name. Ranks outside a case's layout take part in the mesh's group creation only. Each
rank reports its per-step losses and, on request, the full gathered parameters.
"""

from __future__ import annotations

import numpy as np

from tests.parallel.harness import spawn_workers

TIMEOUT_S = 300
VOCAB = 256

# A small Llama (dim 64, 4 layers, GQA, untied head, 256-token vocabulary) on rows of 32 tokens;
# 4 rows per step in micro-batches of one row, so DP2 accumulates 2 and one process 4.
SMALL = [
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    f"model.vocab_size={VOCAB}",
    "model.multiple_of=32",
    "model.max_seq_len=64",
    "model.rope_scaling=false",
    "training.seq_len=32",
    "training.micro_batch_rows=1",
    "training.global_batch_rows=4",
    "training.warmup_steps=1",
    "training.lr=3e-3",
    "metrics.progress=false",
    "metrics.plot=false",
    "metrics.gpu_telemetry=false",
    "metrics.peak_flops=1e12",
    "checkpoint.enabled=false",
]


def write_dataset(folder) -> str:
    """Random documents of 5-60 token ids below VOCAB, stamped with the packaged tokenizer's hash."""
    from llama3hp.data import write_token_dataset
    from llama3hp.data.tokenizer import tokenizer_file_sha256

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, size=int(rng.integers(5, 60))) for _ in range(300)]
    write_token_dataset(docs, folder, tokenizer_sha256=tokenizer_file_sha256(), vocab_size=VOCAB)
    return str(folder)


def build_job(dataset: str, *overrides: str):
    from llama3hp.config import load_job_config

    return load_job_config("tiny", [*SMALL, f'data.datasets=["{dataset}"]', *overrides])


def run_case(case: dict) -> dict | None:
    """Train one case on this rank; None when the rank is outside the case's layout."""
    from llama3hp.parallel import build_mesh, context_from_mesh
    from llama3hp.train.trainer import Trainer

    job = build_job(case["dataset"], *case["overrides"])
    mesh = build_mesh(job.parallel)
    if mesh is None:
        return None
    trainer = Trainer(job, ctx=context_from_mesh(mesh), resume=case.get("resume"))
    result = trainer.run()
    out = {
        "losses": result.losses,
        "steps": [r["step"] for r in result.rows],
        "run_dir": str(result.run_dir),
        "fp8_fqns": trainer.fp8_fqns,
        "fp8_share": [r.get("fp8_share") for r in result.rows],
    }
    if case.get("params"):
        out["params"] = trainer.model.full_state_dict()
    if case.get("rows"):
        out["rows"] = result.rows
        out["mesh"] = tuple(trainer.ctx.mesh.dims.sizes.values()) if trainer.ctx.mesh is not None else None
    return out


def spawn_trainers(world: int, cases: list[dict], timeout_s: float = TIMEOUT_S) -> list[dict]:
    """Run `cases` on `world` spawned gloo ranks; per rank, {case name: result or None or {"error"}}."""
    return spawn_workers(run_case, world, cases, timeout_s)
